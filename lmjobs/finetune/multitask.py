"""Multi-task fine-tuning: one shared encoder, a head per task, rows of all tasks mixed by weight.

Every task's features share one layout so they travel through the same data plan: labels are
[rows, max_len] (a classification label at position 0, IGNORE elsewhere) and `task_ids` says
whose row it is.  The data plan's weighted mixture draws each step's rows from the tasks (each
task one source).  The model computes the encoder once per micro-batch and each head on its
rows; the loss is the mean over the tasks present of each task's mean loss (balance "tasks") or
the mean over rows (balance "rows").  Exports are one plain Hugging
Face model per task (BertForSequenceClassification / BertForTokenClassification).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from lmjobs.finetune.features import IGNORE

KINDS = ("classification", "tokens")


class MultiTaskModel(torch.nn.Module):
    """A BERT-family encoder (with its pooler) and one linear head per task."""

    def __init__(self, encoder, tasks: list[dict], dropout: float, balance: str = "tasks"):
        super().__init__()
        self.balance = balance
        self.encoder = encoder
        self.config = encoder.config
        self.kinds = [t["task"] for t in tasks]
        self.heads = torch.nn.ModuleList(torch.nn.Linear(encoder.config.hidden_size, len(t["labels"])) for t in tasks)
        self.dropout = torch.nn.Dropout(dropout)

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, task_ids=None,
                inputs_embeds=None):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           inputs_embeds=inputs_embeds)
        rows = out.last_hidden_state.shape[0]
        if task_ids is None:  # a single-task batch of the first task (probe, plain use)
            task_ids = torch.zeros(rows, dtype=torch.long, device=out.last_hidden_state.device)
        sequence, pooled = self.dropout(out.last_hidden_state), self.dropout(out.pooler_output)
        # every head takes part in every step (a zero term when its task has no rows here), so each
        # parameter has a gradient on every rank: ZeRO reduces the same set of tensors everywhere
        loss = sum(0.0 * p.sum() for p in self.heads.parameters())
        logits, present = None, int(task_ids.unique().numel())  # tasks with rows in this micro-batch
        for t, (kind, head) in enumerate(zip(self.kinds, self.heads)):
            mine = task_ids == t
            if not bool(mine.any()):
                continue
            if kind == "classification":
                logits = head(pooled[mine])
                if labels is not None:
                    target = labels[mine] if labels.dim() == 1 else labels[mine][:, 0]
                    loss = loss + torch.nn.functional.cross_entropy(logits, target) * self._share(mine, rows, present)
            else:
                logits = head(sequence[mine])
                if labels is not None:
                    loss = loss + torch.nn.functional.cross_entropy(
                        logits.transpose(1, 2), labels[mine], ignore_index=IGNORE) * self._share(mine, rows, present)
        return SimpleNamespace(loss=loss if labels is not None else None, logits=logits)

    def _share(self, mine: torch.Tensor, rows: int, present: int):
        return 1.0 / present if self.balance == "tasks" else mine.sum() / rows

    def task_model(self, t: int, labels: list[str]):
        """Task t as a plain transformers model (the encoder's weights and that head)."""
        import copy

        import transformers

        kind = self.kinds[t]
        head_class = (transformers.AutoModelForSequenceClassification if kind == "classification"
                      else transformers.AutoModelForTokenClassification)
        config = copy.deepcopy(self.config)
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
        model = head_class.from_config(config)
        encoder = getattr(model, model.base_model_prefix)
        wanted = encoder.state_dict().keys()  # a token head's BertModel has no pooler
        encoder.load_state_dict({k: v for k, v in self.encoder.state_dict().items() if k in wanted})
        model.classifier.load_state_dict(self.heads[t].state_dict())
        return model


def unified(features: dict, task: str, task_id: int, max_len: int) -> dict:
    """One task's features in the shared layout (labels [rows, max_len], task_ids)."""
    out = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    rows = len(out["input_ids"])
    if task == "classification":
        labels = np.full((rows, max_len), IGNORE, dtype=np.int64)
        labels[:, 0] = features["labels"]
    else:
        labels = features["labels"].astype(np.int64)
    out["labels"] = labels
    out["task_ids"] = np.full(rows, task_id, dtype=np.int64)
    out["length"] = out["attention_mask"].sum(1).astype(np.int32)
    return out
