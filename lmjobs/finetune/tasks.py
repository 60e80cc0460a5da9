"""Fine-tuning tasks for the shared Trainer (lmjobs.trainer.Task): model with the task's head, inputs,
loss, distributed evaluation with the task's metrics, and the Hugging Face export.

Evaluation: each rank forwards every world-th row of the eval features (padded with repeats so
every rank runs the same number of forwards, as ZeRO-3 needs), the per-row outputs are gathered
on every rank, and every rank computes the same metrics.  The final evaluation also writes
RUN_DIR/eval.json (per-label table, confusion matrix or per-type scores, sample predictions).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torch.distributed as dist

from cluster import storage
from lmjobs.export import output_logits
from lmjobs.config import FinetuneSpec
from lmjobs.finetune import base, metrics
from lmjobs.finetune.adversarial import AdversarialOutputs, perturbed_embeddings
from lmjobs.finetune.features import IGNORE, sft_pieces
from lmjobs.trainer import num_params_m, world_size
from lmjobs.models import num_params

FEATURES = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions", "task_ids",
            "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
PROBE_TEXT = ("Who wrote the play?", "The play was written by William Shakespeare in London.")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def to_inputs(columns: dict) -> dict[str, torch.Tensor]:
    """Feature columns of a micro-batch as model inputs, cut to the longest row (dynamic padding)."""
    longest = max(1, max(int(np.stack(columns[k]).sum(1).max()) for k in ("attention_mask", "rejected_attention_mask")
                         if k in columns))
    out = {}
    for name in FEATURES:
        if name in columns:
            values = np.stack(columns[name])
            out[name] = torch.as_tensor(np.ascontiguousarray(values[:, :longest] if values.ndim == 2 else values),
                                        dtype=torch.long)
    return out


def _attacked(strategy, inputs: dict, attack) -> object:
    """Eval-mode outputs on adversarially perturbed embeddings (the gold labels drive the attack)."""
    module = strategy.module
    module.eval()
    try:
        inputs = {k: v.to(strategy.device) for k, v in inputs.items()}
        embeds = perturbed_embeddings(module, inputs, attack.method, attack.epsilon, attack.steps, attack.alpha)
        with torch.no_grad():
            return module(inputs_embeds=embeds, **{k: v for k, v in inputs.items() if k != "input_ids"})
    finally:
        module.train()


def predict(strategy, features: dict[str, np.ndarray], batch_size: int, collect, attack=None, forward=None) -> list:
    """collect(outputs, inputs) -> one value per row of the batch; returns every row's value, in
    row order, on every rank.  attack: score perturbed inputs instead (an AdversarialSection);
    forward(inputs) -> outputs: the task's own evaluation forward (default strategy.forward_eval)."""
    n = len(features["input_ids"])
    rank, world = _rank(), world_size()
    mine = np.arange(rank, n, world)
    per_rank = -(-n // world)
    padded = np.concatenate([mine, np.zeros(per_rank - len(mine), np.int64)])  # repeats of row 0, dropped below
    values: list = []
    for lo in range(0, per_rank, batch_size):
        rows = padded[lo:lo + batch_size]
        inputs = to_inputs({k: v[rows] for k, v in features.items()})
        if attack is not None:
            outputs = _attacked(strategy, inputs, attack)
        else:
            outputs = forward(inputs) if forward else strategy.forward_eval(inputs)
        values += collect(outputs, inputs)
    pairs = list(zip(mine.tolist(), values[:len(mine)]))
    gathered = [pairs]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, pairs)
    out: list = [None] * n
    for part in gathered:
        for row, value in part:
            out[row] = value
    return out


def _row_ce(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """(summed cross-entropy, scored positions) per row."""
    logits = logits.float()
    if logits.dim() == 2:
        return [(float(v), 1) for v in torch.nn.functional.cross_entropy(logits, labels, reduction="none")]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=IGNORE)
    return [(float(c.sum()), int((lab != IGNORE).sum())) for c, lab in zip(ce, labels)]


class FinetuneTask:
    kind = "finetune"
    headline = "accuracy"  # the metric the log line and the campaign look at

    def __init__(self, spec: FinetuneSpec, info: dict, base_dir: str, run_dir: str):
        self.spec, self.info, self.run_dir = spec, info, run_dir
        self.base_dir = base.resolve(base_dir, spec.output.storage)  # on this worker's node
        self.tokenizer = base.tokenizer(self.base_dir)

    # -- model ---------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        model = base.load_model(self.base_dir, self.info["task"], len(self.info.get("labels") or []) or 2,
                                self.tokenizer.pad_token_id, self.spec.train.seed, self.spec.model.dropout)
        base.freeze(model, self.spec.model.freeze_layers, self.spec.model.freeze_embeddings)
        if self.spec.model.lora is not None:
            model = base.add_lora(model, self.info["task"], self.spec.model.lora)
        return model

    def describe(self, model) -> str:
        lora = f", LoRA r={self.spec.model.lora.r}" if self.spec.model.lora else ""
        return f"{self.info['task']} from {self.spec.model.base}: {num_params_m(model)}{lora}, " \
               f"{self.info['train_rows']} training rows"

    def flops_per_token(self, model) -> float:
        """6 N over the weights that multiply (an embedding lookup is no matmul; a tied LM head is)."""
        embedding = model.get_input_embeddings().weight.numel()
        tied = self.info["task"] == "sft" and getattr(model.config, "tie_word_embeddings", False)
        return 6 * (num_params(model) - (0 if tied else embedding))

    def length_at(self, step: int) -> int:
        return self.spec.data.max_seq_len

    def inputs(self, batch: dict, step: int, length: int) -> dict:
        return to_inputs(batch)

    def forward(self, engine, inputs: dict):
        """The training forward: plain, or clean + adversarial (spec.adversarial with train: true)."""
        adv = self.spec.adversarial
        if adv is None or not adv.train:
            return engine(**inputs)
        embeds = perturbed_embeddings(engine.module, inputs, adv.method, adv.epsilon, adv.steps, adv.alpha)
        attacked = engine(inputs_embeds=embeds, **{k: v for k, v in inputs.items() if k != "input_ids"})
        return AdversarialOutputs(engine(**inputs), attacked)

    def loss(self, outputs, inputs):
        if isinstance(outputs, AdversarialOutputs):
            return outputs.loss, {"clean_loss": float(outputs.clean_loss), "adv_loss": float(outputs.adversarial_loss)}
        return outputs.loss, {}

    def tokens(self, inputs: dict) -> int:
        return int(inputs["attention_mask"].sum()) * self.spec.scaling.num_workers

    def log_line(self, metrics_: dict, evaluated: bool) -> str:
        held = f" val {self.headline} {metrics_[f'val_{self.headline}']:.4f}" if evaluated else ""
        return f"loss {metrics_['loss']:.4f}{held}"

    # -- export --------------------------------------------------------------------------------
    def probe(self) -> dict:
        enc = self.tokenizer(*PROBE_TEXT, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def probe_logits(self, outputs) -> torch.Tensor:
        return output_logits(outputs)

    def save_hf(self, module, directory: str) -> None:
        model = base.merged(module)
        labels = self.info.get("labels")
        if labels and self.info["task"] != "sft":
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {name: i for i, name in enumerate(labels)}
        model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if self.info["task"] == "preference":  # what RLHF needs to score pairs exactly as they were trained
            from lmjobs.finetune.features import REWARD_ENCODING

            pathlib.Path(directory, REWARD_ENCODING).write_text(json.dumps(
                {"max_seq_len": self.spec.data.max_seq_len, "encoding": "prompt + response + end, end kept"}))

    def state_extra(self) -> dict:
        return {"task": self.info["task"]}

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, strategy, val: dict, final: bool) -> dict:
        figures, details = self.scores(strategy, val)
        if final and _rank() == 0:
            report = {"task": self.info["task"], **figures, **details}
            storage.write_text(storage.join(self.run_dir, "eval.json"), json.dumps(report, indent=2),
                               self.spec.output.storage)
        return {f"val_{k}": v for k, v in figures.items()}

    def scores(self, strategy, val: dict) -> tuple[dict, dict]:
        raise NotImplementedError


class Classification(FinetuneTask):
    def scores(self, strategy, val):
        def collect(outputs, inputs):
            logits = outputs.logits.float()
            losses = _row_ce(logits, inputs["labels"].to(logits.device))
            return [(int(p), ce) for p, (ce, _) in zip(logits.argmax(-1), losses)]

        rows = predict(strategy, val["features"], self.spec.eval.eval_batch_size, collect)
        pred = [p for p, _ in rows]
        result = metrics.classification(val["features"]["labels"].tolist(), pred, self.info["labels"])
        figures = {"loss": float(np.mean([ce for _, ce in rows])), "accuracy": result["accuracy"],
                   "macro_f1": result["macro_f1"]}
        if self.spec.adversarial is not None:  # robustness: the same perturbation at evaluation
            attacked = predict(strategy, val["features"], self.spec.eval.eval_batch_size, collect,
                               self.spec.adversarial)
            gold = val["features"]["labels"]
            figures["adv_accuracy"] = float(np.mean([p == g for (p, _), g in zip(attacked, gold)]))
        examples = [{"text": t, "gold": self.info["labels"][g], "pred": self.info["labels"][p]}
                    for t, g, p in zip(val["texts"][:20], val["features"]["labels"][:20], pred[:20])]
        return figures, {"per_label": result["per_label"], "confusion": result["confusion"],
                         "labels": result["labels"], "examples": examples}


class Tokens(FinetuneTask):
    headline = "f1"

    def scores(self, strategy, val):
        def collect(outputs, inputs):
            logits = outputs.logits.float()
            labels = inputs["labels"].to(logits.device)
            losses = _row_ce(logits, labels)
            preds = logits.argmax(-1)
            return [(preds[i][labels[i] != IGNORE].tolist(), losses[i]) for i in range(len(preds))]

        rows = predict(strategy, val["features"], self.spec.eval.eval_batch_size, collect)
        tags = self.info["labels"]
        gold = val["tags"]
        pred = [[tags[t] for t in p] + ["O"] * (len(g) - len(p)) for (p, _), g in zip(rows, gold)]
        result = metrics.entity_f1(gold, pred)
        ce, n = sum(c for _, (c, _) in rows), sum(k for _, (_, k) in rows)
        figures = {"loss": ce / max(n, 1), "precision": result["precision"], "recall": result["recall"],
                   "f1": result["f1"]}
        return figures, {"per_type": result["per_type"],
                         "examples": [{"tokens": t, "gold": g, "pred": p}
                                      for t, g, p in zip(val["tokens"][:10], gold[:10], pred[:10])]}


class QuestionAnswering(FinetuneTask):
    headline = "f1"

    def scores(self, strategy, val):
        def collect(outputs, inputs):
            n = inputs["attention_mask"].sum(1)
            # to the host first: .numpy() refuses CUDA tensors
            s, e, n = outputs.start_logits.float().cpu(), outputs.end_logits.float().cpu(), n.cpu()
            return [(s[i, :n[i]].numpy(), e[i, :n[i]].numpy()) for i in range(len(n))]

        rows = predict(strategy, val["features"], self.spec.eval.eval_batch_size, collect)
        answers = metrics.qa_predictions(val["windows"], [s for s, _ in rows], [e for _, e in rows],
                                         val["contexts"])
        result = metrics.squad(answers, val["answers"])
        figures = {"exact_match": result["exact_match"], "f1": result["f1"]}
        examples = [{"id": q, "prediction": answers.get(q, ""), "answers": a}
                    for q, a in list(val["answers"].items())[:20]]
        return figures, {"questions": result["questions"], "windows": len(val["windows"]), "examples": examples}


class SFT(FinetuneTask):
    headline = "loss"

    def log_line(self, metrics_: dict, evaluated: bool) -> str:
        held = f" val response loss {metrics_['val_loss']:.4f}" if evaluated else ""
        return f"loss {metrics_['loss']:.4f}{held}"

    def scores(self, strategy, val):
        def collect(outputs, inputs):
            logits = outputs.logits[:, :-1].float()
            return _row_ce(logits, inputs["labels"][:, 1:].to(logits.device))

        rows = predict(strategy, val["features"], self.spec.eval.eval_batch_size, collect)
        figures = {"loss": sum(c for c, _ in rows) / max(sum(n for _, n in rows), 1)}
        return figures, {}

    def evaluate(self, strategy, val: dict, final: bool) -> dict:
        out = super().evaluate(strategy, val, final)
        if final and self.spec.eval.num_generations:
            samples = self.generate(strategy, val["prompts"][:self.spec.eval.num_generations])
            if _rank() == 0:
                uri = storage.join(self.run_dir, "eval.json")
                report = json.loads(storage.read_text(uri, self.spec.output.storage))
                report["generations"] = samples
                storage.write_text(uri, json.dumps(report, indent=2), self.spec.output.storage)
        return out

    @torch.no_grad()
    def generate(self, strategy, prompts: list[dict]) -> list[dict]:
        """Greedy answers to held-out prompts (rank 0, with the full module under ZeRO-3)."""
        samples = []
        with strategy.gathered_module() as module:
            if _rank() != 0:
                return []
            module.eval()
            try:
                for row in prompts:
                    prompt, _ = sft_pieces(row, self.tokenizer)
                    ids = torch.tensor([prompt], device=strategy.device)
                    out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=self.spec.eval.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id)
                    samples.append({"prompt": self.tokenizer.decode(prompt),
                                    "reference": row.get("response") or row["messages"][-1]["content"],
                                    "generation": self.tokenizer.decode(out[0, len(prompt):],
                                                                        skip_special_tokens=True)})
            finally:
                module.train()
        return samples


class MultiTask(FinetuneTask):
    """Several classification / token tasks on one shared encoder (lmjobs.finetune.multitask)."""

    def __init__(self, spec: FinetuneSpec, info: dict, base_dir: str, run_dir: str):
        super().__init__(spec, info, base_dir, run_dir)
        self.subtasks = [TASK_CLASSES[t["task"]](spec, t, base_dir, run_dir) for t in info["tasks"]]
        first = info["tasks"][0]
        self.headline = f"{first['name']}_{TASK_CLASSES[first['task']].headline}"

    def build_model(self) -> torch.nn.Module:
        import transformers

        from lmjobs.finetune.multitask import MultiTaskModel

        torch.manual_seed(self.spec.train.seed)
        encoder = transformers.AutoModel.from_pretrained(self.base_dir, attn_implementation="eager")
        if encoder.config.model_type != "bert" or getattr(encoder, "pooler", None) is None:
            raise ValueError(f"multitask needs a BERT-family encoder with a pooler; {self.spec.model.base} is "
                             f"{encoder.config.model_type}")
        dropout = self.spec.model.dropout if self.spec.model.dropout is not None else encoder.config.hidden_dropout_prob
        model = MultiTaskModel(encoder, self.info["tasks"], dropout, self.spec.multitask.loss)
        base.freeze(model, self.spec.model.freeze_layers, self.spec.model.freeze_embeddings)
        return model

    def describe(self, model) -> str:
        tasks = ", ".join(f"{t['name']} ({t['task']}, {t['train_rows']} rows, weight {w:.2g})"
                          for t, w in zip(self.info["tasks"], self.info["weights"]))
        return f"multitask from {self.spec.model.base}: {num_params_m(model)}; {tasks}"

    def scores(self, strategy, val):
        figures, details = {}, {}
        for sub, task in zip(self.subtasks, self.info["tasks"]):
            if task["name"] in val:
                f, d = sub.scores(strategy, val[task["name"]])
                figures.update({f"{task['name']}_{k}": v for k, v in f.items()})
                details[task["name"]] = d
        return figures, {"tasks": details}

    def save_hf(self, module, directory: str) -> None:
        """hf/ is the first task's model; hf-NAME/ each other task's (the shared encoder and its head)."""
        for t, task in enumerate(self.info["tasks"]):
            target = directory if t == 0 else f"{directory}-{task['name']}"
            module.task_model(t, task["labels"]).save_pretrained(target, safe_serialization=True)
            self.tokenizer.save_pretrained(target)


class Preference(FinetuneTask):
    """A reward model: one score per text, trained on preference pairs with the Bradley-Terry loss;
    evaluated by pairwise accuracy (the chosen response scored above the rejected one)."""

    headline = "accuracy"

    def forward(self, engine, inputs: dict):
        ids = torch.cat([inputs["input_ids"], inputs["rejected_input_ids"]])
        mask = torch.cat([inputs["attention_mask"], inputs["rejected_attention_mask"]])
        return engine(input_ids=ids, attention_mask=mask)

    def loss(self, outputs, inputs):
        from lmjobs.preference import bradley_terry_loss

        scores = outputs.logits.float().squeeze(-1)
        n = inputs["input_ids"].shape[0]
        loss, figures = bradley_terry_loss(scores[:n], scores[n:])
        return loss, {"pair_accuracy": figures["accuracy"], "margin": figures["margin"]}

    def tokens(self, inputs: dict) -> int:
        return int(inputs["attention_mask"].sum() + inputs["rejected_attention_mask"].sum()) * self.spec.scaling.num_workers

    def scores(self, strategy, val):
        def collect(outputs, inputs):
            return [float(x) for x in outputs.logits.float()[:, 0]]

        feats = val["features"]
        chosen = predict(strategy, {"input_ids": feats["input_ids"], "attention_mask": feats["attention_mask"]},
                         self.spec.eval.eval_batch_size, collect)
        rejected = predict(strategy, {"input_ids": feats["rejected_input_ids"],
                                      "attention_mask": feats["rejected_attention_mask"]},
                           self.spec.eval.eval_batch_size, collect)
        margin = np.asarray(chosen) - np.asarray(rejected)
        figures = {"loss": float(np.mean(np.logaddexp(0.0, -margin))), "accuracy": float(np.mean(margin > 0)),
                   "margin": float(np.mean(margin))}
        examples = [{"prompt": r["prompt"][-300:], "chosen": r["chosen"][:300], "rejected": r["rejected"][:300],
                     "chosen_score": c, "rejected_score": j}
                    for r, c, j in zip(val["rows"][:10], chosen[:10], rejected[:10])]
        return figures, {"pairs": len(margin), "examples": examples}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens ([batch]); labels are the input ids with
    IGNORE off the response (position t's logits predict token t + 1)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(torch.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


class DPO(FinetuneTask):
    """Direct preference optimisation: the policy's log-probability margin between the chosen and
    the rejected response, against the same margin under a frozen copy of the starting weights
    (the reference, held beside the policy in each worker)."""

    headline = "reward_margin"

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        reference = base.load_model(self.base_dir, "dpo", 0, self.tokenizer.pad_token_id, self.spec.train.seed)
        self.reference = reference.eval().requires_grad_(False)
        return model

    def _pair(self, module, inputs: dict) -> torch.Tensor:
        ids = torch.cat([inputs["input_ids"], inputs["rejected_input_ids"]])
        mask = torch.cat([inputs["attention_mask"], inputs["rejected_attention_mask"]])
        labels = torch.cat([inputs["labels"], inputs["rejected_labels"]])
        return sequence_logps(module(input_ids=ids, attention_mask=mask).logits, labels)

    def forward(self, engine, inputs: dict):
        self.reference.to(inputs["input_ids"].device)
        with torch.no_grad():
            reference = self._pair(self.reference, inputs)
        return {"policy": self._pair(engine, inputs), "reference": reference}

    def loss(self, outputs, inputs):
        from lmjobs.preference import dpo_loss

        n = inputs["input_ids"].shape[0]
        policy, reference = outputs["policy"], outputs["reference"]
        return dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.spec.dpo.beta)

    def tokens(self, inputs: dict) -> int:
        return int(inputs["attention_mask"].sum() + inputs["rejected_attention_mask"].sum()) * self.spec.scaling.num_workers

    def log_line(self, metrics_: dict, evaluated: bool) -> str:
        held = f" val dpo loss {metrics_['val_loss']:.4f} margin {metrics_['val_reward_margin']:.4f}" if evaluated else ""
        return f"loss {metrics_['loss']:.4f}{held}"

    def scores(self, strategy, val):
        from lmjobs.preference import dpo_loss

        def forward(inputs):
            module = strategy.engine.module
            module.eval()
            try:
                with torch.no_grad():
                    inputs = {k: v.to(strategy.device) for k, v in inputs.items()}
                    self.reference.to(strategy.device)
                    return self._pair(strategy.engine, inputs), self._pair(self.reference, inputs)
            finally:
                module.train()

        def collect(outputs, inputs):
            policy, reference = (x.float().cpu().tolist() for x in outputs)
            n = len(policy) // 2
            return [(policy[i], policy[n + i], reference[i], reference[n + i]) for i in range(n)]

        rows = torch.tensor(predict(strategy, val["features"], self.spec.eval.eval_batch_size, collect,
                                    forward=forward), dtype=torch.float64)
        loss, figures = dpo_loss(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], self.spec.dpo.beta)
        return {"loss": float(loss), **figures}, {"pairs": len(rows)}


TASK_CLASSES = {"classification": Classification, "tokens": Tokens, "qa": QuestionAnswering, "sft": SFT,
                "multitask": MultiTask, "preference": Preference, "dpo": DPO}


def build(spec: FinetuneSpec, info: dict, base_dir: str, run_dir: str) -> FinetuneTask:
    return TASK_CLASSES[info["task"]](spec, info, base_dir, run_dir)


def build_task(spec: FinetuneSpec, payload: dict, rank: int, world: int, run_dir: str) -> tuple[FinetuneTask, None]:
    """In a Train worker (lmjobs.runner): the task; the held-out features come in the job's config."""
    return build(spec, payload["info"], payload["base_dir"], run_dir), None
