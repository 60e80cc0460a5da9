"""Job specs: typed, frozen, validated before any cluster work, errors name the field."""
import subprocess
import sys

import pydantic
import pytest

from cluster.spec import JobSpec, Section, SpecError, load_spec, parse_override, resolved_dict
from lmjobs.config import PretrainSpec
from lmjobs.kinds import KINDS
from tests.conftest import REPO

TINY = REPO / "lmjobs" / "recipes" / "tiny.yaml"


def write(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def problems(path, overrides=()):
    with pytest.raises(SpecError) as info:
        load_spec(path, KINDS, list(overrides))
    return info.value.problems


def test_recipes_validate_and_fill_defaults(monkeypatch):
    from lmjobs.kinds import problems as kind_problems

    monkeypatch.chdir(REPO)  # recipes name ../shared/data relative to the checkout
    for recipe in (REPO / "lmjobs" / "recipes").glob("*.yaml"):
        spec = load_spec(recipe, KINDS)
        assert spec.kind in KINDS
        if spec.kind == "pipeline":  # every stage checked, inputs from earlier stages as their outputs
            assert kind_problems(spec) == [], recipe
    spec = load_spec(TINY, KINDS)
    assert isinstance(spec, PretrainSpec)
    assert spec.global_batch_size == 8 * 1 * 2
    resolved = resolved_dict(spec)
    assert resolved["optim"]["betas"] == [0.9, 0.95]  # default filled in
    assert resolved["output"]["storage"] == {"endpoint_url": None, "region": None}


def test_misspelt_key_names_path_and_closest(tmp_path):
    p = write(tmp_path, "kind: pretrain\nname: x\nmodel:\n  hiden_size: 64\n")
    [msg] = problems(p)
    assert msg.startswith("model.hiden_size: unknown key")
    assert "did you mean 'hidden_size'" in msg


def test_wrong_type_and_allowed_values(tmp_path):
    p = write(tmp_path, "kind: pretrain\nname: x\ntrain:\n  steps: many\ndeepspeed:\n  zero_stage: 4\n")
    msgs = problems(p)
    assert any(m.startswith("train.steps:") and "integer" in m for m in msgs)
    assert any(m.startswith("deepspeed.zero_stage:") and "0, 1, 2 or 3" in m for m in msgs)


@pytest.mark.parametrize("overrides, needle", [
    (["deepspeed.precision=fp16"], "fp16 needs scaling.use_gpu=true"),
    (["model.num_heads=3"], "multiple of model.num_heads"),
    (["deepspeed.offload_params=true"], "offload_params needs deepspeed.zero_stage 3"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "offload_optimizer needs"),
    (["optim.min_lr=1"], "must not exceed optim.lr"),
    (["optim.warmup_steps=12"], "must be below train.steps"),
])
def test_impossible_combinations(overrides, needle):
    msgs = problems(TINY, overrides)
    assert any(needle in m for m in msgs), msgs


def test_unknown_kind_and_bad_yaml(tmp_path):
    [msg] = problems(write(tmp_path, "kind: pretrian\nname: x\n"))
    assert "did you mean 'pretrain'" in msg
    [msg] = problems(write(tmp_path, "kind: pretrain\nname: [x\n"))
    assert "not valid YAML" in msg


def test_overrides():
    assert parse_override("optim.lr=3e-4") == (["optim", "lr"], 3e-4)
    assert parse_override("scaling.use_gpu=true") == (["scaling", "use_gpu"], True)
    assert parse_override("optim.betas=[0.9, 0.99]") == (["optim", "betas"], [0.9, 0.99])
    spec = load_spec(TINY, KINDS, ["optim.lr=3e-2", "output.storage.region=eu-west-1"])
    assert spec.optim.lr == 3e-2 and spec.output.storage.region == "eu-west-1"
    [msg] = problems(TINY, ["optim.lr.x=1"])
    assert "'lr' is not a section" in msg


def test_configs_are_frozen():
    spec = load_spec(TINY, KINDS)
    with pytest.raises(pydantic.ValidationError):
        spec.optim.lr = 1.0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmjobs.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_validate_one_line_exit_2(tmp_path):
    p = write(tmp_path, TINY.read_text().replace("hidden_size:", "hidden_sise:"))
    out = run_cli("validate", str(p))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "model.hidden_sise: unknown key; did you mean 'hidden_size'?" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    ok = run_cli("validate", str(TINY))
    assert ok.returncode == 0 and "valid pretrain spec 'tiny'" in ok.stdout


def test_job_command_validates_before_cluster_work(tmp_path):
    """A bad spec fails in well under Ray's start-up time and never starts Ray."""
    out = run_cli("pretrain", str(TINY), "--set", "train.stepz=3")
    assert out.returncode == 2
    assert "train.stepz: unknown key; did you mean 'steps'?" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


class Weighted(Section):
    name: str
    weight: float = pydantic.Field(1.0, ge=0)


class Mix(Section):
    mixture: list[Weighted] = []


class ToySpec(JobSpec):
    data: Mix = Mix()
    extra: Mix | None = None


def test_list_items_are_named_with_brackets(tmp_path):
    p = write(tmp_path, "kind: toy\nname: x\ndata:\n  mixture:\n  - {name: a}\n  - {name: b, weight: -1, wieght: 2}\n"
                        "extra:\n  mixture: [{nmae: c}]\n")
    with pytest.raises(SpecError) as info:
        load_spec(p, {"toy": ToySpec})
    assert sorted(info.value.problems) == [
        "data.mixture[1].weight: Input should be greater than or equal to 0 (got -1)",
        "data.mixture[1].wieght: unknown key; did you mean 'weight'? valid keys here: name, weight",
        "extra.mixture[0].name: required field is missing",
        "extra.mixture[0].nmae: unknown key; did you mean 'name'? valid keys here: name, weight",
    ]
    [msg] = problems(write(tmp_path, "kind: data_prepare\nname: x\nsources: [{path: a, format: xml}]\n"))
    assert msg.startswith("sources[0].format: Input should be 'text'"), msg


def test_check_same_names_the_first_differing_field_and_lets_lenient_ones_pass():
    from cluster.spec import check_same, field_at

    saved = {"data": {"source": "a", "val_blocks": 2}, "train": {"seed": 1}}
    assert field_at(saved, "data.source") == "a" and field_at(saved, "data.missing.deeper") is None
    check_same(saved, saved, ("data", "train.seed"), "x", "fix")
    changed = {"data": {"source": "a", "val_blocks": 3}, "train": {"seed": 2}}
    with pytest.raises(ValueError, match=r"^data: x with data = .*mix two runs\. fix$"):
        check_same(saved, changed, ("data", "train.seed"), "x", "fix")
    only_val = lambda a, b: {k: v for k, v in a.items() if k != "val_blocks"} == {  # noqa: E731
        k: v for k, v in b.items() if k != "val_blocks"}
    with pytest.raises(ValueError, match=r"^train\.seed: x with train\.seed = 1, but the spec says 2"):
        check_same(saved, changed, ("data", "train.seed"), "x", "fix", lenient={"data": only_val})


def test_overrides_into_list_sections():
    """--set steps into lists by index (the README's `--set icl.0.num_examples=50`), for every
    kind; a bad index or a key where an index belongs is refused, naming the field."""
    demo_eval = REPO / "lmjobs/recipes/demo-eval.yaml"
    spec = load_spec(demo_eval, KINDS, ["icl.0.num_examples=50", "icl[0].shots=[0, 5]", "models.1.path=/models/small",
                                        "icl.-1.limit=20"])
    assert spec.icl[0].num_examples == 50 and spec.icl[0].shots == [0, 5] and spec.icl[0].limit == 20
    assert spec.models[1].path == "/models/small" and spec.models[1].name == "smollm2"
    spec = load_spec(demo_eval, KINDS, ["icl.1.task=rte", "icl.1.shots=[0]"])  # N = the length appends one
    assert [s.task for s in spec.icl] == ["sst2", "rte"]
    [msg] = problems(demo_eval, ["icl.5.shots=[1]"])
    assert "icl[5] is out of range (icl has 1 item; 1 appends one)" in msg
    [msg] = problems(demo_eval, ["icl.shots=[1]"])
    assert "'icl' is a list; give an index (e.g. icl.0.shots)" in msg
    [msg] = problems(demo_eval, ["icl.0.shots=[99]"])  # the value is checked where it landed
    assert msg.startswith("icl[0].shots") and "between 0 and 64" in msg
    [msg] = problems(demo_eval, ["icl.0.shotz=[1]"])
    assert "icl[0].shotz: unknown key; did you mean 'shots'?" in msg
    multitask = REPO / "lmjobs/recipes/finetune-multitask.yaml"  # another kind, a list one level deeper
    spec = load_spec(multitask, KINDS, ["multitask.tasks.1.max_eval_examples=10"])
    assert spec.multitask.tasks[1].max_eval_examples == 10 and spec.multitask.tasks[0].name == "sst2"
    [msg] = problems(multitask, ["multitask.tasks.0.name.x=1"])
    assert "'name' is not a section or a list" in msg
