"""Scoring as Ray Data batch inference: a pool of actors, one model copy each.

The driver tokenises everything and cuts the work into requests whose composition depends only
on the spec (never on how many actors there are); each request is one forward batch.  An actor
runs requests with a fixed thread count, so a request's numbers are the same bits whichever actor
runs it: results are identical across runs and between 1 and N actors.

Request ops:
- `loglik`: items {ctx, conts}: the log-probability of each continuation after the context, its
  token count and whether greedy decoding would have produced it.  When every continuation is a
  single token, one forward pass of the context scores them all.
- `nll`: items {ids, score_from}: summed negative log-likelihood of ids[p] for p >= score_from
  (p >= 1), and the count (perplexity windows).
- `generate`: items {ids, max_new_tokens, stop, seed, temperature, top_k}: the decoded text.
- `head`: items are rows of fine-tuning features; the head's predictions (class, tags, spans).
"""
from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np

IGNORE = -100


class Scorer:
    """One model replica in the pool."""

    def __init__(self, directory: str, head: str, threads: int, precision: str, use_gpu: bool,
                 storage_data: dict | None = None):
        import torch
        import transformers

        from cluster.storage import StorageConfig
        from lmjobs.finetune.base import resolve

        # the model as this actor's node has it (pkg:, an s3:// copy cached per node, a local path)
        directory = resolve(directory, StorageConfig.model_validate(storage_data) if storage_data else None)

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        cls = getattr(transformers, head)
        self.model = cls.from_pretrained(directory, attn_implementation="eager").to(self.device).eval()
        self.precision = precision

    def _autocast(self):
        if self.precision == "bf16":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for text in batch["request"]:
            request = json.loads(text)
            with self.torch.inference_mode(), self._autocast():
                out.append(json.dumps(getattr(self, request["op"])(request["items"])))
        return {"id": batch["id"], "result": np.asarray(out, dtype=object)}

    def _forward(self, seqs: list[list[int]]):
        """Right-padded batch -> float32 log-probs [batch, len, vocab] on the host."""
        torch = self.torch
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, :len(s)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()

    def loglik(self, items: list[dict]) -> list[list[dict]]:
        seqs, plan = [], []  # plan: (item, continuation, sequence index, positions)
        for i, item in enumerate(items):
            ctx, conts = item["ctx"], item["conts"]
            if all(len(c) == 1 for c in conts):
                seqs.append(ctx)
                plan += [(i, j, len(seqs) - 1, [len(ctx) - 1]) for j in range(len(conts))]
            else:
                for j, cont in enumerate(conts):
                    seqs.append((ctx + cont)[:-1])
                    plan.append((i, j, len(seqs) - 1, list(range(len(ctx) - 1, len(ctx) + len(cont) - 1))))
        logp = self._forward(seqs)
        out: list[list[dict]] = [[{} for _ in item["conts"]] for item in items]
        for i, j, s, positions in plan:
            cont = items[i]["conts"][j]
            rows = logp[s, positions]  # [len(cont), vocab]
            picked = rows[range(len(cont)), cont]
            greedy = bool((rows.argmax(-1) == self.torch.as_tensor(cont)).all())
            out[i][j] = {"logprob": float(picked.sum()), "tokens": len(cont), "greedy": greedy}
        return out

    def nll(self, items: list[dict]) -> list[dict]:
        logp = self._forward([item["ids"][:-1] for item in items])
        out = []
        for s, item in enumerate(items):
            ids = item["ids"]
            positions = list(range(max(item["score_from"], 1), len(ids)))
            if not positions:
                out.append({"nll": 0.0, "tokens": 0})
                continue
            picked = logp[s, [p - 1 for p in positions], [ids[p] for p in positions]]
            out.append({"nll": float(-picked.double().sum()), "tokens": len(positions)})
        return out

    def generate(self, items: list[dict]) -> list[str]:
        torch = self.torch
        out = []
        for item in items:
            torch.manual_seed(item["seed"])
            ids = torch.as_tensor([item["ids"]], device=self.device)
            sample = item["temperature"] > 0
            kwargs = {"do_sample": True, "temperature": item["temperature"], "top_k": item["top_k"] or None} \
                if sample else {"do_sample": False}
            gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=item["max_new_tokens"],
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                                      **kwargs)
            text = self.tokenizer.decode(gen[0][ids.shape[1]:], skip_special_tokens=True)
            for stop in item.get("stop") or []:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out

    def head(self, items: list[dict]) -> list[Any]:
        torch = self.torch
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in items[0]]
        inputs = {k: torch.as_tensor(np.asarray([it[k] for it in items]), dtype=torch.long).to(self.device)
                  for k in names}
        outputs = self.model(**inputs)
        if hasattr(outputs, "start_logits"):  # extractive QA: each window's span logits up to its length
            n = inputs["attention_mask"].sum(1).cpu()
            s, e = outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu()
            return [[s[i, :n[i]].tolist(), e[i, :n[i]].tolist()] for i in range(len(items))]
        preds = outputs.logits.float().argmax(-1).cpu()
        if preds.dim() == 1:  # sequence classification
            return [int(p) for p in preds]
        return [[int(p) for p, lab in zip(preds[i].tolist(), it["labels"]) if lab != IGNORE]  # tokens
                for i, it in enumerate(items)]


def run_pool(directory: str, head: str, requests: list[dict], compute, storage_cfg=None) -> list[Any]:
    """Each request's result, in order, from a pool of `compute.num_actors` replicas (Ray must be up)."""
    import ray.data

    if not requests:
        return []
    rows = [{"id": i, "request": json.dumps(r)} for i, r in enumerate(requests)]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * compute.num_actors))
    out = ds.map_batches(Scorer, fn_constructor_kwargs={
        "directory": directory, "head": head, "threads": compute.threads_per_actor,
        "precision": compute.precision, "use_gpu": compute.gpus_per_actor > 0,
        "storage_data": storage_cfg.model_dump(mode="json") if storage_cfg else None},
        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=compute.num_actors),
        num_cpus=compute.cpus_per_actor, num_gpus=compute.gpus_per_actor or None)
    results: list[Any] = [None] * len(rows)
    for batch in out.iter_batches(batch_size=256, batch_format="numpy"):
        for i, text in zip(batch["id"], batch["result"]):
            results[int(i)] = json.loads(text)
    assert all(r is not None for r in results), "a request came back without a result"
    return results


def batched(items: list[dict], batch_size: int, op: str, cost=lambda item: 1) -> list[dict]:
    """Requests of at most `batch_size` sequences (an item may count for several), in item order."""
    requests, current, used = [], [], 0
    for item in items:
        c = cost(item)
        if current and used + c > batch_size:
            requests.append({"op": op, "items": current})
            current, used = [], 0
        current.append(item)
        used += c
    if current:
        requests.append({"op": op, "items": current})
    return requests
