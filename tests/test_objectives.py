"""MLM / MLM+NSP batch construction, activation checkpointing and the sequence-length curriculum
(plain torch, no Ray)."""
import numpy as np
import pytest
import torch

from cluster.spec import SpecError, load_spec
from data_pipelines.tokenizer import byte_level
from lmjobs.config import ModelSection, PretrainSpec
from lmjobs.kinds import KINDS
from lmjobs.models import build_model
from lmjobs.pretrain import objectives
from lmjobs.pretrain.worker import seq_len_at
from tests.conftest import REPO

TOKENIZER = objectives.with_specials(byte_level().to_str())


def blocks(n=512, length=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, length))


def test_specials_are_appended_after_the_corpus_vocabulary():
    mlm = objectives.MaskedLM(TOKENIZER, 0.15, seed=0)
    assert (mlm.mask_id, mlm.cls_id, mlm.sep_id, mlm.pad_id) == (257, 258, 259, 260)
    assert mlm.num_plain == 257  # random replacements never produce a special token


def test_mlm_masks_15_percent_80_10_10_deterministically():
    mlm = objectives.MaskedLM(TOKENIZER, 0.15, seed=0)
    ids = blocks()
    keys = np.arange(len(ids))
    batch = mlm.batch(ids, keys, step=3)
    labels, inputs = batch["labels"].numpy(), batch["input_ids"].numpy()
    scored = labels != objectives.IGNORE
    assert abs(scored.mean() - 0.15) < 0.01
    assert (labels[scored] == ids[scored]).all()  # labels are the original tokens
    assert (inputs[~scored] == ids[~scored]).all()  # unscored positions are untouched
    masked = (inputs[scored] == mlm.mask_id).mean()
    kept = (inputs[scored] == ids[scored]).mean()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1 - 0.1 / 257) < 0.03
    assert inputs.max() <= mlm.mask_id
    # the same (seed, step, sample) masks the same way, a later epoch differently
    again = mlm.batch(ids[::-1], keys[::-1], step=3)
    assert torch.equal(again["labels"].flip(0), batch["labels"])
    assert not torch.equal(mlm.batch(ids, keys, step=4)["labels"], batch["labels"])


def test_nsp_pairs_half_true_continuations():
    nsp = objectives.MaskedLMNextSentence(TOKENIZER, 0.15, seed=0)
    ids = blocks(n=400, length=32)
    batch = nsp.batch(ids, np.arange(400), step=0)
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    original = np.where(labels != objectives.IGNORE, labels, inputs)  # undo the masking
    a, b = (32 - 3) // 2, 32 - 3 - (32 - 3) // 2
    assert (original[:, 0] == nsp.cls_id).all() and (original[:, a + 1] == nsp.sep_id).all()
    assert (original[:, -1] == nsp.sep_id).all()
    assert (labels[:, [0, a + 1, 31]] == objectives.IGNORE).all()  # specials are never scored
    assert (batch["token_type_ids"].numpy()[:, :a + 2] == 0).all() and (batch["token_type_ids"].numpy()[:, a + 2:] == 1).all()
    assert (original[:, 1:a + 1] == ids[:, :a]).all()  # A: the block's first half
    is_random = batch["next_sentence_label"].numpy() == 1
    assert 0.4 < is_random.mean() < 0.6
    true_b = (original[:, a + 2:a + 2 + b] == ids[:, a:a + b]).all(axis=1)
    assert true_b[~is_random].all() and not true_b[is_random].any()
    with pytest.raises(ValueError, match="micro_batch_size must be at least 2"):
        nsp.batch(ids[:1], np.arange(1), step=0)


def test_activation_checkpointing_same_loss_and_grads():
    cfg = dict(hidden_size=32, num_layers=2, num_heads=2)
    ids = torch.as_tensor(blocks(4, 32) % 257)
    grads = []
    for ckpt in (False, True):
        model = build_model(ModelSection(**cfg, activation_checkpointing=ckpt), 257, 32, seed=0)
        assert model.is_activation_checkpointing == ckpt
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_seq_len_warmup_curriculum():
    spec = PretrainSpec.model_validate({"name": "c", "data": {"seq_len": 64, "seq_len_warmup_steps": 10,
                                                              "seq_len_start": 16}, "train": {"steps": 20}})
    lengths = [seq_len_at(spec, s) for s in range(20)]
    assert lengths[0] == 16 and lengths[10:] == [64] * 10
    assert lengths == sorted(lengths) and all(n % 8 == 0 for n in lengths)


def test_objective_needs_matching_family():
    tiny = REPO / "lmjobs" / "recipes" / "tiny.yaml"
    with pytest.raises(SpecError, match="model.objective mlm needs model.family bert"):
        load_spec(tiny, KINDS, ["model.objective=mlm"])
    with pytest.raises(SpecError, match="micro_batch_size must be at least 2"):
        load_spec(tiny, KINDS, ["model.objective=mlm_nsp", "model.family=bert", "train.micro_batch_size=1"])
