"""The RLHF roles as Ray actors, and `ActorGroup`, which hides their placement, fan-out and restarts.

- `PolicyActor` trains through lmjobs' DeepSpeed strategy (a world of one process), computes the
  old policy's log-probs, hands out its trainable weights in buckets through the object store,
  saves and loads checkpoints, exports the Hugging Face model.  It may hold the reference too.
- `ReferenceActor`: the frozen starting policy's log-probs.
- `CriticActor`: PPO's value model, trained through the same strategy.
- `RolloutActor`: batched sampling with a KV cache (`sampler` for the Llama family); takes weight buckets.
- `RewardActor`: the reward functions, reward model and/or remote scorer.
"""
from __future__ import annotations

import os
import socket
import time

import ray

ACTOR_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RoleLost(RuntimeError):
    """An actor of a role died more often than the role may restart (the policy, reference and
    critic never restart in place: their state is the run's)."""


# what a lost node (or a role's actor that died for good) raises in the driver: the whole run then
# restarts from its last checkpoint (train.max_failures)
LOST_ERRORS = (RoleLost, *ACTOR_ERRORS, ray.exceptions.ObjectLostError)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _world_of_one() -> None:
    """DeepSpeed initialises torch.distributed: a lone actor is a world of one (gloo on CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})


def _spec(data: dict):
    from lmjobs.rlhf.spec import RlhfSpec

    return RlhfSpec.model_validate(data)


def load_lm(spec, head: str = "sft", model: str | None = None, trainable: bool = True):
    """(tokenizer, model) of a role: the policy's base (or `model`), dropout off (the log-probs of
    sampling and of training must agree), LoRA / frozen layers as the policy has them."""
    from lmjobs.finetune.base import add_lora, freeze, load_model, resolve, tokenizer

    directory = resolve(model or spec.policy.model, spec.output.storage)  # on this actor's node
    tok = tokenizer(directory)
    lm = load_model(directory, head, 1, tok.pad_token_id, spec.train.seed, dropout=0.0, attention="sdpa")
    if trainable and head == "sft":
        if spec.policy.freeze_layers:
            freeze(lm, spec.policy.freeze_layers, embeddings=False)
        if spec.policy.lora is not None:
            lm = add_lora(lm, "sft", spec.policy.lora)
    if not trainable:
        lm.eval().requires_grad_(False)
    return tok, lm


def _autocast(precision: str):
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16_autocast" else contextlib.nullcontext()


def sample(model, tok, spec, prompts: list[str], group_size: int, seed: int, precision: str) -> dict:
    """`group_size` sampled completions of each prompt (rows prompt by prompt), with a KV cache:
    the lean loop of `sampler` for the Llama family, `generate` for other models."""
    import torch

    from lmjobs.rlhf import sampler
    from lmjobs.rlhf.sequences import completions_of, encode_prompts, left_pad

    encoded = encode_prompts(tok, prompts, spec.data.chat_template, spec.data.max_prompt_tokens)
    rows = [ids for ids in encoded for _ in range(group_size)]
    ids, mask = left_pad(rows, tok.pad_token_id)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    r = spec.rollout
    with torch.no_grad(), _autocast(precision):
        if sampler.supports(model):
            generated, _ = sampler.lean_generate(
                model, ids, mask, r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        else:
            generated = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=r.temperature, top_k=r.top_k,
                top_p=r.top_p, max_new_tokens=r.max_new_tokens, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, use_cache=True)[:, ids.shape[1]:]
    model.train(was_training)
    completions = completions_of(generated, tok.eos_token_id)
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    return {"prompt_ids": rows, "completion_ids": completions, "texts": texts}


class _Trained:
    """A model trained through the DeepSpeed strategy in this one process."""

    def _setup(self, spec, model, optim, micro_batch_size: int):
        from lmjobs.runner import quiet_worker
        from lmjobs.strategy import DeepSpeedStrategy
        from lmjobs.device import device_rates, resolve_precision, training_device

        quiet_worker()
        precision = spec.deepspeed.precision
        if precision == "auto":
            rates = device_rates(training_device(bool(spec.policy.gpus)), ("fp32", "bf16"))["rates"]
            precision = resolve_precision(precision, rates)
        self.precision = precision
        updates = spec.ppo.epochs * (spec.completions_per_step // micro_batch_size)
        _world_of_one()
        self.strategy = DeepSpeedStrategy(spec.deepspeed, optim, micro_batch_size, spec.train.steps * updates,
                                          precision)
        self.engine = self.strategy.setup(model)

    def ping(self) -> bool:
        return True

    def _evaluate(self, fn, batch: dict, threads: int | None):
        """fn(module, batch) in eval mode, without gradients (dropout is off anyway; eval for hooks)."""
        import torch

        _threads(threads)
        module = self.engine.module
        module.eval()
        try:
            with torch.no_grad(), _autocast(self.precision):
                return fn(module, batch)
        finally:
            module.train()

    def save(self, uri: str, client_state: dict) -> None:
        """The DeepSpeed checkpoint into `uri` (local or s3://: written on this node, then uploaded)."""
        from cluster import storage

        with storage.writable_dir(uri, self.spec.output.storage) as directory:
            self.strategy.save(directory, client_state)

    def load(self, uri: str) -> dict:
        from cluster import storage

        with storage.readable_dir(uri, self.spec.output.storage) as directory:
            return self.strategy.load(directory)


@ray.remote
class PolicyActor(_Trained):
    def __init__(self, spec_data: dict):
        import torch

        spec = self.spec = _spec(spec_data)
        torch.manual_seed(spec.train.seed)
        self.tok, model = load_lm(spec)
        self.micro = spec.ppo.minibatch_size or spec.completions_per_step
        self._setup(spec, model, spec.optim.resolved(), self.micro)
        self.reference = None
        if spec.reference.colocate and spec.kl.coef > 0:
            self.reference = load_lm(spec, trainable=False)[1]

    def info(self) -> dict:
        params = list(self.engine.module.parameters())
        return {"precision": self.precision, "params": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad)}

    def logprobs(self, batch: dict, threads: int | None = None):
        """The current policy's log-probs [B, C] (the 'old' policy of this step's PPO ratios)."""
        from lmjobs.rlhf.sequences import forward_logits, token_logprobs

        logits = self._evaluate(forward_logits, batch, threads)
        return token_logprobs(logits, batch["completion_ids"], self.spec.rollout.temperature)[0]

    def generate(self, prompts: list[str], group_size: int, seed: int, precision: str,
                 threads: int | None = None) -> dict:
        """Colocated rollout: the policy samples with its own weights (nothing to sync)."""
        # (a bf16 copy of the weights to sample from was slower on CPU than fp32 weights under
        # autocast: bf16 norms and softmax there cost more than the casts they save)
        _threads(threads)
        with self.strategy.gathered_module() as module:
            return {**sample(module, self.tok, self.spec, prompts, group_size, seed, precision), "version": None}

    def reference_logprobs(self, batch: dict, threads: int | None = None):
        import torch

        from lmjobs.rlhf.sequences import forward_logits, token_logprobs

        _threads(threads)
        with torch.no_grad(), _autocast(self.precision):
            logits = forward_logits(self.reference, batch)
        return token_logprobs(logits, batch["completion_ids"], self.spec.rollout.temperature)[0]

    def train(self, batch: dict, step: int, kl_coef: float, threads: int | None = None) -> dict:
        """PPO-clip updates over the step's completions: `ppo.epochs` passes of minibatches.  batch
        carries `advantages` [B, C] and, when known, `old_logprobs` and `ref_logprobs` [B, C]."""
        import torch

        from lmjobs.rlhf.losses import kl_penalty, masked_mean, policy_loss
        from lmjobs.rlhf.sequences import forward_logits, rows, token_logprobs

        _threads(threads)
        spec = self.spec
        kl_in_loss = spec.kl_where == "loss" and "ref_logprobs" in batch and kl_coef > 0
        generator = torch.Generator().manual_seed(spec.train.seed * 100003 + step)
        # dropout draws from the global stream: a function of (seed, step), so a resumed run updates
        # exactly as the uninterrupted one (a restarted actor's stream would start afresh)
        torch.manual_seed(spec.train.seed * 100043 + step)
        size = batch["input_ids"].shape[0]
        sums: dict[str, float] = {}
        count = 0

        def loss_fn(logits, mb):
            mask = mb["completion_mask"]
            want_grad_entropy = spec.ppo.entropy_coef > 0
            logp, ent = token_logprobs(logits, mb["completion_ids"], spec.rollout.temperature,
                                       with_entropy=want_grad_entropy)
            if ent is None:
                with torch.no_grad():
                    ent = token_logprobs(logits.detach(), mb["completion_ids"], spec.rollout.temperature, True)[1]
            old = mb.get("old_logprobs", logp.detach())
            loss, figures = policy_loss(logp, old, mb["advantages"], mask, spec.ppo.clip)
            figures["policy_loss"] = float(loss.detach())
            if kl_in_loss:
                kl = masked_mean(kl_penalty(logp, mb["ref_logprobs"], spec.kl_estimator), mask)
                loss = loss + kl_coef * kl
                figures["kl_loss"] = float(kl.detach())
            entropy = masked_mean(ent, mask)
            if want_grad_entropy:
                loss = loss - spec.ppo.entropy_coef * entropy
            figures["entropy"] = float(entropy.detach())
            return loss, figures

        def forward(engine, mb):
            return forward_logits(engine, mb)

        for _ in range(spec.ppo.epochs):
            order = torch.randperm(size, generator=generator) if self.micro < size else torch.arange(size)
            for index in order.split(self.micro):
                _, figures = self.strategy.forward_backward(rows(batch, index), loss_fn, forward)
                for key, value in figures.items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
        out = {key: value / count for key, value in sums.items()}
        out["grad_norm"] = self.strategy.grad_norm()
        out["lr"] = self.strategy.lr()
        return out

    def weights(self, bucket_mb: float = 64.0) -> tuple[list, int]:
        """The trainable tensors (all of them, or only LoRA's / the unfrozen layers'), put into the
        object store in buckets of about bucket_mb; (bucket refs, bytes)."""
        buckets, current, size, total = [], {}, 0, 0
        with self.strategy.gathered_module() as module:
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                tensor = p.detach().to("cpu", copy=True).contiguous()
                current[name] = tensor
                size += tensor.numel() * tensor.element_size()
                if size >= bucket_mb * 2 ** 20:
                    buckets.append(ray.put(current))
                    total, current, size = total + size, {}, 0
        if current:
            buckets.append(ray.put(current))
            total += size
        return buckets, total

    def trainable_state(self) -> dict:
        """The tensors weight sync sends, by name (for checks: what a rollout worker must hold)."""
        with self.strategy.gathered_module() as module:
            return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}

    def logits(self, ids):
        """The policy's logits for token ids [B, T], as it is now (LoRA adapters applied, not merged)."""
        import torch

        with torch.no_grad(), self.strategy.gathered_module() as module:
            was = module.training
            module.eval()
            try:
                return module(input_ids=ids).logits.float()
            finally:
                module.train(was)

    def export(self, uri: str) -> str:
        """The policy as a Hugging Face directory (LoRA merged), with its tokenizer, at `uri`."""
        from cluster import storage
        from lmjobs.finetune.base import merged

        with storage.writable_dir(uri, self.spec.output.storage) as directory:
            with self.strategy.gathered_module() as module:
                model = merged(module)
                model.save_pretrained(directory, safe_serialization=True)
            self.tok.save_pretrained(directory)
        return uri


@ray.remote
class CriticActor(_Trained):
    def __init__(self, spec_data: dict):
        spec = self.spec = _spec(spec_data)
        model = load_lm(spec, head="AutoModelForTokenClassification", model=spec.critic.model)[1]
        self.micro = spec.ppo.minibatch_size or spec.completions_per_step
        optim = spec.optim.resolved().model_copy(update={"lr": spec.critic.lr, "min_lr": spec.critic.lr})
        self._setup(spec, model, optim, self.micro)

    def values(self, batch: dict, threads: int | None = None):
        from lmjobs.rlhf.sequences import token_values

        return self._evaluate(token_values, batch, threads)

    def train(self, batch: dict, step: int, threads: int | None = None) -> dict:
        """Value updates toward the returns (clipped around the rollout's values)."""
        import torch

        from lmjobs.rlhf.losses import value_loss
        from lmjobs.rlhf.sequences import rows, token_values

        _threads(threads)
        spec = self.spec
        generator = torch.Generator().manual_seed(spec.train.seed * 100019 + step)
        torch.manual_seed(spec.train.seed * 100057 + step)  # dropout, as the policy's
        size = batch["input_ids"].shape[0]
        sums, count = {"value_loss": 0.0, "vf_clipfrac": 0.0}, 0

        def loss_fn(values, mb):
            loss, figures = value_loss(values, mb["old_values"], mb["returns"], mb["completion_mask"],
                                       spec.ppo.value_clip)
            return spec.ppo.vf_coef * loss, {"value_loss": float(loss.detach()), **figures}

        for _ in range(spec.ppo.epochs):
            order = torch.randperm(size, generator=generator) if self.micro < size else torch.arange(size)
            for index in order.split(self.micro):
                _, figures = self.strategy.forward_backward(rows(batch, index), loss_fn,
                                                            lambda engine, mb: token_values(engine, mb))
                for key in sums:
                    sums[key] += figures[key]
                count += 1
        return {key: value / count for key, value in sums.items()}


@ray.remote
class ReferenceActor:
    def __init__(self, spec_data: dict):
        from lmjobs.runner import quiet_worker

        quiet_worker()
        self.spec = _spec(spec_data)
        self.model = load_lm(self.spec, trainable=False)[1]

    def ping(self) -> bool:
        return True

    def logprobs(self, batch: dict, precision: str, threads: int | None = None):
        import torch

        from lmjobs.rlhf.sequences import forward_logits, token_logprobs

        _threads(threads)
        with torch.no_grad(), _autocast(precision):
            logits = forward_logits(self.model, batch)
        return token_logprobs(logits, batch["completion_ids"], self.spec.rollout.temperature)[0]


@ray.remote
class RolloutActor:
    """Samples completions with the policy's latest weights (the KV cache of `generate`)."""

    def __init__(self, spec_data: dict, index: int):
        from lmjobs.runner import quiet_worker

        quiet_worker()
        self.spec, self.index = _spec(spec_data), index
        self.tok, self.model = load_lm(self.spec)
        self.model.eval().requires_grad_(False)
        self.version = -1  # the controller step whose weights this worker holds

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def tensors(self, names: list[str]) -> dict:
        """This worker's tensors of those names (for checks after a weight sync)."""
        state = self.model.state_dict()
        return {n: state[n].detach().clone() for n in names}

    def load_weights(self, buckets: list, version: int) -> int:
        """Copy the policy's tensors in; returns this worker's weight version."""
        import torch

        with torch.no_grad():
            for ref in buckets:
                state = ray.get(ref)
                result = self.model.load_state_dict(state, strict=False)
                if result.unexpected_keys:
                    raise RuntimeError(f"rollout {self.index}: the policy sent tensors this model lacks: "
                                       f"{result.unexpected_keys[:3]}")
        self.version = version
        return version

    def generate(self, prompts: list[str], group_size: int, seed: int, precision: str,
                 threads: int | None = None) -> dict:
        _threads(threads)
        return {**sample(self.model, self.tok, self.spec, prompts, group_size, seed, precision), "version": self.version}


@ray.remote
class RewardActor:
    def __init__(self, section_data: dict, sources: dict, storage_data: dict | None = None, auth: str | None = None):
        from cluster.storage import StorageConfig
        from lmjobs.rlhf.rewards import Scorer
        from lmjobs.rlhf.spec import RlhfRewardSection

        self.scorer = Scorer(RlhfRewardSection.model_validate(section_data), sources,
                             StorageConfig.model_validate(storage_data) if storage_data else None, auth)

    def ping(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def score(self, prompts: list[str], completions: list[str], threads: int | None = None,
              step: int | None = None) -> dict:
        _threads(threads)
        return self.scorer.score(prompts, completions, step)


class Placement:
    """One placement group with a bundle per actor of every role, reserved before any actor starts;
    a restarted actor comes back into its own bundle."""

    def __init__(self, bundles: list[tuple[str, int, dict]], strategy: str, timeout_s: float, fixed: bool = False,
                 log=print):
        """fixed: the cluster cannot grow (the embedded one): a reservation larger than it fails at
        once.  Otherwise the wait is bounded by timeout_s (an autoscaler may be booting nodes)."""
        from cluster import capacity

        self.index = {(role, i): k for k, (role, i, _) in enumerate(bundles)}
        self.group = capacity.reserve(
            [b for _, _, b in bundles], timeout_s=timeout_s, field="placement_timeout_s", strategy=strategy,
            what=f"placement: the roles ({len(bundles)} actors)", fixed=fixed, log=log,
            hint="lower the roles' cpus/gpus or rollout.num_workers, or colocate the reference / rollout "
                 "with the policy")

    def strategy(self, role: str, i: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=self.index[(role, i)])}

    def remove(self) -> None:
        ray.util.remove_placement_group(self.group)


def placed_cores(placement: Placement | None) -> int:
    """CPUs of the node the roles share: the smallest node holding one of the placement's bundles
    (PACK puts them on one node where it can), or without a placement group the smallest node
    with CPUs.  The threads of the roles' processes split these cores."""
    nodes = {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]}
    if placement is not None:
        used = set(ray.util.placement_group_table(placement.group)["bundles_to_node_id"].values())
        cpus = [nodes[n] for n in used if n in nodes]
    else:
        cpus = [c for c in nodes.values() if c]
    return max(1, int(min(cpus))) if cpus else 1


class ActorGroup:
    """`num` actors of one role.  `call` fans a method out (one argument tuple an actor) and
    gathers the results; an actor that dies is restarted by Ray (`max_restarts`), `on_restart(i)`
    brings it up to date (e.g. the policy's weights), and its share is asked again."""

    def __init__(self, role: str, cls, num: int, args, resources: dict, max_restarts: int = 0, log=print,
                 placement: "Placement | None" = None):
        self.role, self.max_restarts, self.log = role, max_restarts, log
        options = {"num_cpus": resources.get("CPU", 0), "num_gpus": resources.get("GPU", 0),
                   "max_restarts": max_restarts, "max_task_retries": 0}
        self.actors = []
        for i in range(num):
            where = placement.strategy(role, i) if placement else {}
            self.actors.append(cls.options(**options, **where).remote(*args(i)))
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.actors)

    def async_call(self, method: str, args: list[tuple]) -> list:
        return [getattr(actor, method).remote(*a) for actor, a in zip(self.actors, args)]

    def call(self, method: str, args: list[tuple], on_restart=None, what: str = "",
             indices: list[int] | None = None) -> list:
        """args[k] to actor indices[k] (default: the first len(args) actors); their results in order."""
        indices = list(range(len(args))) if indices is None else indices
        refs = [getattr(self.actors[i], method).remote(*a) for i, a in zip(indices, args)]
        results = []
        for i, a, ref in zip(indices, args, refs):
            failures = 0
            while True:
                try:
                    results.append(ray.get(ref))
                    break
                except ACTOR_ERRORS as exc:
                    failures += 1
                    if failures > self.max_restarts:
                        raise RoleLost(f"{self.role} actor {i} died {failures} times{what}; giving up "
                                           f"({type(exc).__name__})") from exc
                    self.log(f"[rlhf] {self.role} actor {i} died{what} ({type(exc).__name__}); "
                             "waiting for its restart, then asking again")
                    self.restarts += 1
                    self._wait_alive(i)
                    if on_restart is not None:
                        on_restart(i)
                    ref = getattr(self.actors[i], method).remote(*a)
        return results

    def _wait_alive(self, i: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ray.get(self.actors[i].ping.remote(), timeout=60)
                return
            except (*ACTOR_ERRORS, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
