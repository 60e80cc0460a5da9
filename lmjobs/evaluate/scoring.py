"""Scoring as Ray Data batch inference: a pool of actors, one model copy each.

The driver tokenises everything and cuts the work into requests whose composition depends only
on the spec (never on how many actors there are); each request is one forward batch.  An actor
runs requests with a fixed thread count, so a request's numbers are the same bits whichever actor
runs it: results are identical across runs and between 1 and N actors.

Request ops:
- `loglik`: items {ctx, conts}: the log-probability of each continuation after the context, its
  token count and whether greedy decoding would have produced it.  When every continuation is a
  single token, one forward pass of the context scores them all.  A request may carry
  `prefix_len`: its contexts' first tokens are the same (an instruction, shared demonstrations),
  so they run once and their key/value cache serves every sequence of the batch (the actor keeps
  the last prefix's cache for the next request that shares it).
- `nll`: items {ids, score_from}: summed negative log-likelihood of ids[p] for p >= score_from
  (p >= 1), and the count (perplexity windows).
- `generate`: items {ids, max_new_tokens, stop, seed, temperature, top_k}: the decoded text;
  greedy items run as one left-padded batch that stops once every row has hit a stop string.

Only the hidden states at the scored positions go through the output layer, and only the
picked log-probabilities (and whether each is the argmax) leave the device.
- `head`: items are rows of fine-tuning features; the head's predictions (class, tags, spans).
"""
from __future__ import annotations

import contextlib
import inspect
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
        config = self.model.config
        # base model + output layer apart, so that only scored positions are projected to the vocabulary;
        # models whose logits are more than that projection (soft-capping, scaling) run whole
        self.split = (head == "AutoModelForCausalLM" and self.model.get_output_embeddings() is not None
                      and not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")))
        params = inspect.signature(self.model.base_model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # a shared prefix's cache needs plain full-attention layers (no sliding windows, no recurrence)
        self.prefix_ok = self.split and not getattr(config, "sliding_window", None) and \
            self.cache_arg in params and "position_ids" in params
        self.prefix_cache: tuple | None = None  # (prefix ids, per-layer (key, value)) of the last prefix

    def _autocast(self):
        if self.precision == "bf16":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for text in batch["request"]:
            request = json.loads(text)
            with self.torch.inference_mode(), self._autocast():
                op = getattr(self, request["op"])
                out.append(json.dumps(op(request["items"], request.get("prefix_len", 0)) if request["op"] == "loglik"
                                      else op(request["items"])))
        return {"id": batch["id"], "result": np.asarray(out, dtype=object)}

    def _prefix_kv(self, prefix: list[int]) -> list[tuple]:
        """Per layer (key, value) [1, heads, len(prefix), dim] of the prefix, computed once."""
        if self.prefix_cache is None or self.prefix_cache[0] != prefix:
            ids = self.torch.as_tensor([prefix], device=self.device)
            out = self.model.base_model(input_ids=ids, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            self.prefix_cache = (prefix, [(layer.keys, layer.values) for layer in cache.layers])
        return self.prefix_cache[1]

    def _picked(self, seqs: list[list[int]], wanted: list[list[tuple[int, int]]], prefix: list[int] = ()):
        """Right-padded batch of `seqs` (each continuing `prefix`) -> for every (position, token) in
        `wanted[i]` (positions within seqs[i]): log p(token | everything before it) and whether the
        token is the argmax there.  Returns two 1-D host tensors in `wanted` order."""
        torch = self.torch
        width, n_prefix = max(len(s) for s in seqs), len(prefix)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), n_prefix + width), dtype=torch.long)
        mask[:, :n_prefix] = 1
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, n_prefix:n_prefix + len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows = torch.as_tensor([i for i, w in enumerate(wanted) for _ in w], device=self.device)
        cols = torch.as_tensor([p for w in wanted for p, _ in w], device=self.device)
        targets = torch.as_tensor([t for w in wanted for _, t in w], device=self.device)
        if not self.split:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[rows, cols]
        else:
            kwargs = {"use_cache": False}
            if n_prefix:
                from transformers import DynamicCache

                kv = [(k.expand(len(seqs), -1, -1, -1), v.expand(len(seqs), -1, -1, -1)) for k, v in self._prefix_kv(prefix)]
                kwargs = {self.cache_arg: DynamicCache(kv), "use_cache": True,
                          "position_ids": torch.arange(n_prefix, n_prefix + width, device=self.device).expand(len(seqs), -1)}
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[rows, cols])  # [scored positions, vocab]
        logp = torch.log_softmax(logits.float(), dim=-1)
        picked = logp.gather(1, targets[:, None])[:, 0]
        return picked.double().cpu(), (logits.argmax(-1) == targets).cpu()

    def loglik(self, items: list[dict], prefix_len: int = 0) -> list[list[dict]]:
        prefix = items[0]["ctx"][:prefix_len] if prefix_len and self.prefix_ok else []
        n = len(prefix)
        seqs, wanted, plan = [], [], []  # plan: (item, continuation, slice of the wanted positions)
        for i, item in enumerate(items):
            ctx, conts = item["ctx"], item["conts"]
            if all(len(c) == 1 for c in conts):
                seqs.append(ctx[n:])
                for j, c in enumerate(conts):
                    plan.append((i, j, len(wanted), 1))
                    wanted.append((len(seqs) - 1, len(ctx) - 1 - n, c[0]))
            else:
                for j, cont in enumerate(conts):
                    seqs.append((ctx + cont)[n:-1])
                    plan.append((i, j, len(wanted), len(cont)))
                    wanted += [(len(seqs) - 1, len(ctx) - 1 - n + q, t) for q, t in enumerate(cont)]
        per_seq: list[list[tuple[int, int]]] = [[] for _ in seqs]
        for s, pos, tok in wanted:  # appended sequence by sequence: per_seq flattened is wanted's order
            per_seq[s].append((pos, tok))
        picked, greedy = self._picked(seqs, per_seq, prefix)
        out: list[list[dict]] = [[{} for _ in item["conts"]] for item in items]
        for i, j, start, count in plan:
            out[i][j] = {"logprob": float(picked[start:start + count].sum()), "tokens": count,
                         "greedy": bool(greedy[start:start + count].all())}
        return out

    def nll(self, items: list[dict]) -> list[dict]:
        seqs, wanted = [], []
        for item in items:
            ids = item["ids"]
            seqs.append(ids[:-1])
            wanted.append([(p - 1, ids[p]) for p in range(max(item["score_from"], 1), len(ids))])
        if not any(wanted):
            return [{"nll": 0.0, "tokens": 0} for _ in items]
        picked, _ = self._picked(seqs, wanted)
        out, at = [], 0
        for w in wanted:
            out.append({"nll": float(-picked[at:at + len(w)].sum()) if w else 0.0, "tokens": len(w)})
            at += len(w)
        return out

    def generate(self, items: list[dict]) -> list[str]:
        greedy = [it for it in items if it["temperature"] <= 0]
        if len(greedy) == len(items) and len(items) > 1:
            return self._generate_greedy(items)
        return [self._generate_one(item) for item in items]

    def _cut(self, text: str, stops: list[str]) -> str:
        for stop in stops or []:
            if stop and stop in text:
                text = text[:text.index(stop)]
        return text

    def _generate_one(self, item: dict) -> str:
        torch = self.torch
        torch.manual_seed(item["seed"])
        ids = torch.as_tensor([item["ids"]], device=self.device)
        sample = item["temperature"] > 0
        # top_k 0 and top_p 1: the full distribution (not the model's generation_config defaults)
        kwargs = {"do_sample": True, "temperature": item["temperature"], "top_k": item["top_k"],
                  "top_p": item.get("top_p", 1.0)} \
            if sample else {"do_sample": False}
        gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=item["max_new_tokens"], pad_token_id=self._pad_id(), **kwargs)
        text = self._cut(self.tokenizer.decode(gen[0][ids.shape[1]:], skip_special_tokens=True), item.get("stop"))
        if item.get("with_ids"):  # the sampled tokens themselves (a decode-encode round trip may differ)
            return {"text": text, "ids": gen[0][ids.shape[1]:].tolist()}
        return text

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def _generate_greedy(self, items: list[dict]) -> list[str]:
        """Greedy answers of a batch at once: left-padded prompts, stopped when every row's text
        holds one of its stop strings (or EOS, or the longest max_new_tokens)."""
        import transformers

        torch, pad = self.torch, self._pad_id()
        width = max(len(it["ids"]) for it in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, width - len(it["ids"]):] = torch.as_tensor(it["ids"])
            mask[i, width - len(it["ids"]):] = 1
        limits = torch.as_tensor([it["max_new_tokens"] for it in items])
        tokenizer = self.tokenizer

        class Stops(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                new = input_ids[:, width:]
                done = [new.shape[1] >= int(limits[i]) or any(
                    s and s in tokenizer.decode(new[i], skip_special_tokens=True) for s in items[i].get("stop") or [])
                    for i in range(len(items))]
                return torch.as_tensor(done, device=input_ids.device)

        gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=False,
                                  max_new_tokens=int(limits.max()), pad_token_id=pad,
                                  stopping_criteria=transformers.StoppingCriteriaList([Stops()]))
        return [self._cut(tokenizer.decode(gen[i][width:width + it["max_new_tokens"]], skip_special_tokens=True),
                          it.get("stop")) for i, it in enumerate(items)]

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


def threads_per_actor(compute) -> int:
    """The spec's thread count, or the cluster's CPUs over the actors (Ray must be up): one actor on
    2 cores runs 2 threads, two run 1 each; never more than the largest node's CPUs."""
    import ray

    if compute.threads_per_actor:
        return compute.threads_per_actor
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    total = sum(nodes) or ray.cluster_resources().get("CPU", 1)
    return max(1, int(min(max(nodes or [total]), total // compute.num_actors)))


def run_pool(directory: str, head: str, requests: list[dict], compute, storage_cfg=None, threads: int = 1) -> list[Any]:
    """Each request's result, in order, from a pool of `compute.num_actors` replicas (Ray must be up)."""
    import ray.data

    if not requests:
        return []
    rows = [{"id": i, "request": json.dumps(r)} for i, r in enumerate(requests)]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 4 * compute.num_actors))
    out = ds.map_batches(Scorer, fn_constructor_kwargs={
        "directory": directory, "head": head, "threads": threads,
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
