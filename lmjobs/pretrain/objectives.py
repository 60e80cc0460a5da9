"""Pre-training objectives: what a packed block becomes on the way into the model, and the
statistics each objective reports.  No Ray and no DeepSpeed here.

- causal_lm: the block is input and label (the model shifts).
- mlm: BERT masking of the block, 15 % of positions by default, of which 80 % become [MASK],
  10 % a random token and 10 % stay; unselected positions are not scored (label -100).
- mlm_nsp: [CLS] A [SEP] B [SEP] with A the first half of the block and B, half of the time, the
  span that follows A in the corpus (label 0, "is next") and otherwise the same span of another
  block of the micro-batch (label 1, "random"), then masked as above; `BertForPreTraining` heads.
  Packed blocks cut documents at arbitrary tokens, so A and B are contiguous corpus spans
  (segment pairs) rather than sentences split at full stops.

Every random choice comes from a generator seeded by (seed, step, sample id): a resumed run
masks exactly as the uninterrupted one did, and a sample is masked afresh in each epoch.
"""
from __future__ import annotations

import numpy as np
import torch

MASK, CLS, SEP, PAD = "[MASK]", "[CLS]", "[SEP]", "[PAD]"
SPECIALS = (MASK, CLS, SEP, PAD)
IGNORE = -100
VAL_STEP = 2**40  # the step the held-out masks are drawn for: the same masks at every evaluation


def with_specials(tokenizer_json: str) -> str:
    """The corpus tokenizer plus [MASK] [CLS] [SEP] [PAD], appended after its last id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.add_special_tokens([s for s in SPECIALS if tok.token_to_id(s) is None])
    return tok.to_str()


class Objective:
    """Turns micro-batches of packed blocks into model inputs; summarises model outputs."""

    name = "causal_lm"

    def batch(self, ids: np.ndarray, keys: np.ndarray, step: int) -> dict[str, torch.Tensor]:
        """ids [batch, seq] token ids, keys [batch] sample ids (fix the random choices)."""
        t = torch.as_tensor(ids, dtype=torch.long)
        return {"input_ids": t, "labels": t}

    def loss(self, outputs, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return outputs.loss, {}

    @staticmethod
    def logits(outputs) -> torch.Tensor:
        return outputs.logits if hasattr(outputs, "logits") else outputs.prediction_logits


class MaskedLM(Objective):
    name = "mlm"

    def __init__(self, tokenizer_json: str, mask_prob: float, seed: int):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        self.mask_id, self.cls_id, self.sep_id, self.pad_id = (tok.token_to_id(s) for s in SPECIALS)
        if None in (self.mask_id, self.cls_id, self.sep_id, self.pad_id):
            raise ValueError("the tokenizer lacks [MASK]/[CLS]/[SEP]/[PAD]; build it with with_specials()")
        self.num_plain = min(self.mask_id, self.cls_id, self.sep_id, self.pad_id)  # random replacements
        self.mask_prob, self.seed = mask_prob, seed

    def _rng(self, step: int, key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, int(key)])

    def _mask(self, row: np.ndarray, rng: np.random.Generator, maskable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.full_like(row, IGNORE)
        chosen = (rng.random(len(row)) < self.mask_prob) & maskable
        if not chosen.any():  # at least one scored position per row
            chosen[rng.choice(np.flatnonzero(maskable))] = True
        labels[chosen] = row[chosen]
        roll = rng.random(len(row))
        out = row.copy()
        out[chosen & (roll < 0.8)] = self.mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        out[swap] = rng.integers(0, self.num_plain, int(swap.sum()))
        return out, labels

    def batch(self, ids, keys, step):
        inputs, labels = zip(*(self._mask(row, self._rng(step, k), np.ones(len(row), bool))
                               for row, k in zip(ids, keys)))
        return {"input_ids": torch.as_tensor(np.stack(inputs), dtype=torch.long),
                "labels": torch.as_tensor(np.stack(labels), dtype=torch.long)}


class MaskedLMNextSentence(MaskedLM):
    name = "mlm_nsp"

    def batch(self, ids, keys, step):
        n, length = ids.shape
        if n < 2:
            raise ValueError("mlm_nsp draws the random B segments from the other rows of a micro-batch: "
                             "train.micro_batch_size must be at least 2")
        a = (length - 3) // 2
        b = length - 3 - a
        inputs, labels, types, nsp = [], [], [], []
        for i, (row, key) in enumerate(zip(ids, keys)):
            rng = self._rng(step, key)
            is_random = bool(rng.random() < 0.5)
            source = ids[(i + 1 + int(rng.integers(n - 1))) % n] if is_random else row
            seq = np.concatenate([[self.cls_id], row[:a], [self.sep_id], source[a:a + b], [self.sep_id]])
            maskable = np.ones(length, bool)
            maskable[[0, a + 1, length - 1]] = False  # never mask [CLS] / [SEP]
            masked, lab = self._mask(seq, rng, maskable)
            inputs.append(masked)
            labels.append(lab)
            types.append(np.r_[np.zeros(a + 2, np.int64), np.ones(b + 1, np.int64)])
            nsp.append(int(is_random))
        return {"input_ids": torch.as_tensor(np.stack(inputs), dtype=torch.long),
                "token_type_ids": torch.as_tensor(np.stack(types), dtype=torch.long),
                "labels": torch.as_tensor(np.stack(labels), dtype=torch.long),
                "next_sentence_label": torch.as_tensor(nsp, dtype=torch.long)}

    def loss(self, outputs, batch):
        seq_logits = outputs.seq_relationship_logits.float()
        target = batch["next_sentence_label"].to(seq_logits.device)
        nsp = torch.nn.functional.cross_entropy(seq_logits, target).detach()
        acc = (seq_logits.argmax(-1) == target).float().mean()
        return outputs.loss, {"mlm_loss": float(outputs.loss.detach() - nsp), "nsp_loss": float(nsp),
                              "nsp_acc": float(acc)}


def build(objective: str, tokenizer_json: str, mask_prob: float, seed: int) -> Objective:
    if objective == "causal_lm":
        return Objective()
    if objective == "mlm":
        return MaskedLM(tokenizer_json, mask_prob, seed)
    if objective == "mlm_nsp":
        return MaskedLMNextSentence(tokenizer_json, mask_prob, seed)
    raise ValueError(f"unknown objective {objective!r}")
