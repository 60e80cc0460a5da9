"""`lmjobs rlhf SPEC.yaml`: the controller.  Each step reads as numbered phases:

  1 generate    rollout workers sample `group_size` completions of each prompt (KV cache)
  2 score       reward actors: functions, reward model, remote scorer
  3 reference   reference log-probs; PPO: old policy log-probs and critic values
  4 advantages  GRPO / RLOO group baselines, or PPO's KL-shaped rewards and GAE
  5 train       PPO-clip updates of the policy (and the critic) through the DeepSpeed strategy
  6 sync        the policy's trainable tensors to every rollout worker through the object store
  7 log         metrics.jsonl, TensorBoard, samples; a checkpoint every `train.checkpoint_every`

`ray.get` happens only at phase boundaries.  A rollout or reward actor that dies is restarted
and its share of the phase asked again (a restarted rollout worker first gets the weights); the
policy, critic and controller state are checkpointed, and running the command again resumes.  A
policy, reference or critic actor lost (or a whole node) restarts every role from the last
checkpoint within the same run (`train.max_failures`).
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import random
import time

import yaml

from cluster import storage
from cluster.spec import check_same, resolved_dict
from lmjobs.rlhf.spec import RlhfSpec

CHECKPOINTS = "checkpoints"
# what a resumed run must share with the run that wrote the checkpoint
SAME_ON_RESUME = ("algorithm", "policy", "critic.model", "data", "train.seed", "train.prompts_per_step",
                  "train.group_size", "deepspeed", "ppo.minibatch_size")


def load_prompts(source: str, cfg=None) -> list[str]:
    """Prompts from a .txt (one a line), .jsonl / .parquet with a `prompt` field, or an ingested
    dataset's train split; local or s3://."""
    suffix = pathlib.PurePosixPath(source).suffix
    if suffix not in (".txt", ".jsonl", ".parquet"):
        from data_pipelines.labelled import read_manifest, read_split

        try:
            directory, manifest = read_manifest(source, cfg)
        except FileNotFoundError:
            raise ValueError(f"data.prompts: {source}: give a .txt, .jsonl or .parquet file or an ingested "
                             "dataset") from None
        records = read_split(directory, manifest, "train", cfg)[1].to_pylist()
    elif suffix == ".txt":
        records = [{"prompt": line.strip()} for line in storage.read_text(source, cfg).splitlines() if line.strip()]
    elif suffix == ".jsonl":
        records = [json.loads(line) for line in storage.read_text(source, cfg).splitlines() if line.strip()]
    elif suffix == ".parquet":
        import io

        import pyarrow.parquet as pq

        records = pq.read_table(io.BytesIO(storage.read_bytes(source, cfg))).to_pylist()
    else:
        raise ValueError(f"data.prompts: {source}: give a .txt, .jsonl or .parquet file or an ingested dataset")
    prompts = [r.get("prompt") for r in records]
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"data.prompts: {source}: record {bad[0]} has no `prompt` text ({len(bad)} such records)")
    if not prompts:
        raise ValueError(f"data.prompts: {source}: no prompts")
    return prompts


def prompt_indices(step: int, per_step: int, num: int, seed: int, shuffle: bool) -> list[int]:
    """The prompts of controller step `step` (1-based): consecutive positions in a stream of
    passes over the prompts, each pass in its own seeded order.  Resuming at a step needs no state."""
    out = []
    for position in range((step - 1) * per_step, step * per_step):
        epoch, offset = divmod(position, num)
        order = list(range(num))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out


def split(items: list, parts: int) -> list[list]:
    """Consecutive, near-equal shares (the first ones one longer)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def run_dir_of(spec: RlhfSpec) -> str:
    """The run directory's URI (local or s3://): every read and write of it goes through
    `cluster.storage`, from the driver and from the actors, on whichever node they run."""
    root = spec.output.root
    if not storage.is_remote(root):
        root = str(pathlib.Path(root).expanduser().resolve())
    return storage.join(root, spec.name)


def latest_checkpoint(run_dir: str, cfg=None) -> str | None:
    """The newest complete checkpoint: controller.json is written last, so a checkpoint cut short
    (a killed driver, a lost node) is never taken."""
    return storage.latest_complete(storage.join(run_dir, CHECKPOINTS), "step_", "controller.json", cfg)


def check_same_run(saved: dict, spec: RlhfSpec, where: str) -> None:
    where = str(where)
    check_same(saved, resolved_dict(spec), SAME_ON_RESUME, f"{where} holds a checkpoint of a run",
               f"Give the run another name, or remove {where.rsplit('/', 2)[0]} to start over")


class Controller:
    def __init__(self, spec: RlhfSpec, progress=print):
        from lmjobs.rlhf.rewards import auth_header, shipped

        self.spec, self.progress, self.cfg = spec, progress, spec.output.storage
        self.run_dir = run_dir_of(spec)
        self.prompts = load_prompts(spec.data.prompts, self.cfg)[:spec.data.max_prompts]
        # reward code read here and sent with the actors' arguments; a wrong path fails before any cluster work
        self.reward_section, self.reward_sources = shipped(spec.reward)
        self.reward_auth = auth_header(spec.reward)  # held in memory only: never in a file or a log line
        self.policy = self.reference = self.critic = self.reward = self.rollout = self.placement = None
        self.step = 0
        self.resume_from = latest_checkpoint(self.run_dir, self.cfg)
        if self.resume_from is not None:
            saved = self._saved(self.resume_from)
            check_same_run(saved["config"], spec, self.resume_from)

    def _saved(self, checkpoint: str) -> dict:
        return json.loads(storage.read_text(storage.join(checkpoint, "controller.json"), self.cfg))

    # -- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        import ray

        from lmjobs import runner
        from lmjobs.rlhf import actors
        from lmjobs.rlhf.losses import AdaptiveKL, FixedKL
        from lmjobs.rlhf.rewards import RunningMoments

        spec = self.spec
        joined = runner.join_cluster(spec.address, spec.embedded_num_cpus)
        storage.write_text(storage.join(self.run_dir, "resolved_config.yaml"),
                           yaml.safe_dump(resolved_dict(spec), sort_keys=False), self.cfg)
        log = self.progress
        t0 = time.perf_counter()
        roles = self.roles()
        if spec.placement != "none":
            self.placement = actors.Placement([(role, i, res) for role, (_, count, res, _) in roles.items()
                                               for i in range(count)], spec.placement, spec.placement_timeout_s,
                                               fixed=joined["embedded"], log=log)
        # the cores the roles' threads share: the embedded cluster's; on a cluster given by address the
        # CPUs of the node(s) the roles were placed on (never this driver's machine)
        self.cores = spec.threads or (max(1, int(ray.cluster_resources().get("CPU", 1))) if joined["embedded"]
                                      else actors.placed_cores(self.placement))
        classes = {"policy": actors.PolicyActor, "reference": actors.ReferenceActor, "critic": actors.CriticActor,
                   "reward": actors.RewardActor, "rollout": actors.RolloutActor}
        groups = {role: actors.ActorGroup(role, classes[role], count, args, res, restarts, log, self.placement)
                  for role, (args, count, res, restarts) in roles.items()}
        self.policy, self.reward = groups["policy"], groups["reward"]
        self.reference, self.critic = groups.get("reference"), groups.get("critic")
        self.rollout = groups.get("rollout", self.policy)  # colocated: the policy samples
        self.info = self.policy.call("info", [()])[0]
        self.precision = self.info["precision"]
        self.kl = (AdaptiveKL(spec.kl.coef, spec.kl.target, spec.kl_horizon) if spec.kl.controller == "adaptive"
                   else FixedKL(spec.kl.coef))
        self.moments = RunningMoments()
        self.step = 0
        if self.resume_from is not None:
            saved = self._saved(self.resume_from)
            self.policy.call("load", [(storage.join(self.resume_from, "policy"),)])
            if self.critic is not None:
                self.critic.call("load", [(storage.join(self.resume_from, "critic"),)])
            self.kl.load_state_dict(saved["kl"])
            self.moments.load_state_dict(saved["moments"])
            self.step = saved["step"]
        self.setup_s = time.perf_counter() - t0
        self.weights, self.weight_bytes = None, 0
        self.sync()  # rollout workers start from the policy's weights (a resumed run's, too)
        where = f"resumed from {self.resume_from.rsplit('/', 1)[1]}" if self.resume_from else "from the start"
        progress_line = (f"[rlhf] {spec.algorithm} on {joined['address']} ({'embedded' if joined['embedded'] else 'joined'}): "
                         f"policy {self.info['params'] / 1e6:.1f}M params ({self.info['trainable'] / 1e6:.2f}M trained, "
                         f"{self.precision}), "
                         f"{'rollout in the policy actor' if spec.rollout.colocate else f'{len(self.rollout)} rollout workers'}, {len(self.reward)} reward actor(s), "
                         f"{'colocated ' if spec.reference.colocate else ''}reference"
                         f"{', critic' if self.critic else ''}; {where}; setup {self.setup_s:.0f} s")
        self.progress(progress_line)

    def roles(self) -> dict:
        """role -> (args of actor i, count, resources, max restarts): the actor groups this spec needs."""
        spec, data = self.spec, resolved_dict(self.spec)
        reward_data = self.reward_section.model_dump(mode="json")
        roles = {"policy": (lambda i: (data,), 1, {"CPU": spec.policy.cpus, "GPU": spec.policy.gpus}, 0)}
        if spec.kl.coef > 0 and not spec.reference.colocate:
            roles["reference"] = (lambda i: (data,), 1, {"CPU": spec.reference.cpus, "GPU": spec.reference.gpus}, 0)
        if spec.algorithm == "ppo":
            roles["critic"] = (lambda i: (data,), 1, {"CPU": spec.critic.cpus, "GPU": spec.critic.gpus}, 0)
        storage_data = spec.output.storage.model_dump(mode="json") if spec.output.storage else None
        roles["reward"] = (lambda i: (reward_data, self.reward_sources, storage_data, self.reward_auth), spec.reward.num_actors,
                           {"CPU": spec.reward.cpus},
                           spec.reward.max_restarts)
        if not spec.rollout.colocate:
            roles["rollout"] = (lambda i: (data, i), spec.rollout.num_workers,
                                {"CPU": spec.rollout.cpus_per_worker, "GPU": spec.rollout.gpus_per_worker},
                                spec.rollout.max_restarts)
        return roles

    # -- the phases -----------------------------------------------------------------------------

    def sync(self) -> dict:
        """Phase 6: the policy's trainable tensors, bucketed into the object store, to every rollout worker."""
        if self.spec.rollout.colocate:
            return {"sync_s": 0.0, "sync_put_s": 0.0, "sync_mb": 0.0}
        t0 = time.perf_counter()
        self.weights, self.weight_bytes = self.policy.call("weights", [(self.spec.train.weight_bucket_mb,)])[0]
        put_s = time.perf_counter() - t0
        self.rollout.call("load_weights", [(self.weights, self.step)] * len(self.rollout), what=" loading weights")
        return {"sync_s": time.perf_counter() - t0, "sync_put_s": put_s, "sync_mb": self.weight_bytes / 2 ** 20}

    def _reload(self, i: int) -> None:
        import ray

        ray.get(self.rollout.actors[i].load_weights.remote(self.weights, self.step))

    def generate(self, step: int) -> dict:
        """Phase 1."""
        spec = self.spec
        indices = prompt_indices(step, spec.train.prompts_per_step, len(self.prompts), spec.train.seed,
                                 spec.data.shuffle)
        shares = [s for s in split(indices, len(self.rollout)) if s]
        threads = self.threads(len(shares))
        args = [([self.prompts[j] for j in share], spec.train.group_size, spec.train.seed * 1_000_003 + step * 1009 + i,
                 self.precision, threads) for i, share in enumerate(shares)]
        # fewer shares than workers: only the first ones work this step
        outs = self.rollout.call("generate", args, on_restart=self._reload, what=f" at step {step}")
        for i, out in enumerate(outs):
            if out["version"] not in (None, self.step):  # restarted between calls: it sampled from its initial weights
                self.progress(f"[rlhf] rollout actor {i} came back from a restart with stale weights at step {step}; "
                              "sending the policy's weights and sampling its share again")
                self.rollout.restarts += 1
                self._reload(i)
                outs[i] = self.rollout.call("generate", [args[i]], self._reload, f" at step {step}", indices=[i])[0]
        prompts = [self.prompts[j] for share in shares for j in share for _ in range(spec.train.group_size)]
        return {"prompts": prompts, "prompt_ids": [r for o in outs for r in o["prompt_ids"]],
                "completion_ids": [r for o in outs for r in o["completion_ids"]],
                "texts": [t for o in outs for t in o["texts"]], "versions": [o["version"] for o in outs]}

    def score(self, rollout: dict, step: int) -> tuple[list[float], dict]:
        """Phase 2: raw scores, then normalised and clipped as the spec says."""
        n = len(self.reward)
        shares = split(list(range(len(rollout["texts"]))), n)
        args = [([rollout["prompts"][i] for i in s], [rollout["texts"][i] for i in s], 1, step) for s in shares]
        outs = self.reward.call("score", args, what=f" at step {step}")
        raw = [v for o in outs for v in o["total"]]
        parts: dict[str, list[float]] = {}
        for o in outs:
            for key, values in o["parts"].items():
                parts.setdefault(key, []).extend(values)
        scores = list(raw)
        if self.spec.reward.normalize:
            self.moments.update(raw)
            scores = [(v - self.moments.mean) / max(self.moments.std, 1e-6) for v in scores]
        if self.spec.reward.clip:
            c = self.spec.reward.clip
            scores = [max(-c, min(c, v)) for v in scores]
        return scores, {"raw": raw, "parts": parts}

    def threads(self, busy: int) -> int:
        """Intra-op threads of each of `busy` processes computing at once: `threads` of the spec, or
        the roles' cores split among them.  Calls in one process run one after another and share
        its threads.  Every phase asks here."""
        return self.spec.threads or max(1, self.cores // max(1, busy))

    def step_once(self, step: int) -> tuple[dict, list[dict]]:
        """One controller step, phase by phase; returns its metrics line and logged samples."""
        timings: dict[str, float] = {}
        t_step = time.perf_counter()
        with _timed(timings, "generate_s"):
            rollout = self.generate(step)  # 1
        with _timed(timings, "score_s"):
            scores, scored = self.score(rollout, step)  # 2
        with _timed(timings, "reference_s"):
            batch, logps = self.reference_old_values(rollout, len(scores))  # 3
        with _timed(timings, "advantages_s"):
            train_batch, figures = self.advantages(batch, scores, logps)  # 4
        with _timed(timings, "train_s"):
            figures.update(self.update(step, batch, train_batch, logps))  # 5
        self.step = step
        timings.update(self.sync())  # 6
        timings["step_s"] = time.perf_counter() - t_step
        coef = self.kl.coef
        self.kl.update(figures.get("kl", 0.0), len(scores))
        return self.record(step, rollout, scores, scored, batch, figures, coef, timings)  # 7

    def reference_old_values(self, rollout: dict, completions: int) -> tuple[dict, dict]:
        """Phase 3: the batch of sequences, and at once in their processes the reference's
        log-probs (for the KL), the policy's own before its update (PPO, several passes or
        minibatches) and the critic's values (PPO)."""
        import ray

        from lmjobs.rlhf.sequences import collate

        spec = self.spec
        batch = collate(rollout["prompt_ids"], rollout["completion_ids"], 0)  # pad: masked out everywhere
        batch_ref = ray.put(batch)
        needs_old = spec.algorithm == "ppo" or spec.ppo.epochs > 1 or (spec.ppo.minibatch_size or 10**9) < completions
        calls = [name for name, wanted in (("reference", self.kl.coef > 0), ("old", needs_old),
                                           ("values", self.critic is not None)) if wanted]
        processes = len({"policy" if c == "old" or (c == "reference" and spec.reference.colocate) else c for c in calls})
        share = self.threads(processes)
        refs = {}
        if "reference" in calls:
            refs["ref"] = (self.policy.async_call("reference_logprobs", [(batch_ref, share)])[0] if spec.reference.colocate
                           else self.reference.async_call("logprobs", [(batch_ref, self.precision, share)])[0])
        if needs_old:
            refs["old"] = self.policy.async_call("logprobs", [(batch_ref, share)])[0]
        if self.critic is not None:
            refs["values"] = self.critic.async_call("values", [(batch_ref, share)])[0]
        got = dict(zip(refs, ray.get(list(refs.values()))))
        return batch, {"ref": got.get("ref"), "old": got.get("old"), "values": got.get("values")}

    def advantages(self, batch: dict, scores: list[float], logps: dict) -> tuple[dict, dict]:
        """Phase 4: per-token advantages (GRPO / RLOO: the group baseline; PPO: GAE over the
        shaped per-token rewards and the critic's values, its returns added to `logps` for the
        critic's update) and the batch the policy's update trains on."""
        import torch

        from lmjobs.rlhf import losses

        spec, mask = self.spec, batch["completion_mask"]
        ref_logp, old_logp, values = logps["ref"], logps["old"], logps["values"]
        score_t = torch.tensor(scores, dtype=torch.float32)
        figures: dict = {}
        if spec.algorithm in ("grpo", "rloo"):
            adv = losses.group_advantages(score_t, spec.train.group_size, spec.algorithm)
            advantages = adv[:, None].expand_as(mask) * mask
        else:
            shaping = self.kl.coef if spec.kl_where == "reward" and ref_logp is not None else 0.0
            rewards = losses.token_rewards(score_t, mask, old_logp, ref_logp, shaping, spec.kl_estimator)
            advantages, logps["returns"] = losses.gae(rewards, values, mask, spec.ppo.gamma, spec.ppo.lam)
            if spec.ppo.whiten_advantages:
                advantages = losses.whiten(advantages, mask)
            figures["explained_variance"] = losses.explained_variance(values, logps["returns"], mask)
            figures["value_mean"] = float(losses.masked_mean(values, mask))
        train_batch = {**batch, "advantages": advantages}
        if old_logp is not None:
            train_batch["old_logprobs"] = old_logp
        if ref_logp is not None:
            train_batch["ref_logprobs"] = ref_logp
            if old_logp is not None:
                figures["kl"] = float(losses.masked_mean(losses.kl_penalty(old_logp, ref_logp, spec.kl_estimator), mask))
        return train_batch, figures

    def update(self, step: int, batch: dict, train_batch: dict, logps: dict) -> dict:
        """Phase 5: the policy's update (and the critic's, beside it in its own process).  PPO's
        first `ppo.critic_warmup_steps` steps update the critic only."""
        import ray

        warmup = self.critic is not None and step <= self.spec.ppo.critic_warmup_steps
        busy = (0 if warmup else 1) + (self.critic is not None)
        refs = [] if warmup else self.policy.async_call("train", [(ray.put(train_batch), step, self.kl.coef,
                                                                   self.threads(busy))])
        if self.critic is not None:
            critic_batch = {**batch, "old_values": logps["values"], "returns": logps["returns"]}
            refs += self.critic.async_call("train", [(ray.put(critic_batch), step, self.threads(busy))])
        figures: dict = {"critic_warmup": warmup} if self.critic is not None else {}
        for result in ray.get(refs):
            figures.update(result)
        if "kl" not in figures and "kl_loss" in figures:
            figures["kl"] = figures["kl_loss"]  # GRPO: measured in the update, before it moved the policy
        return figures

    def record(self, step: int, rollout: dict, scores: list[float], scored: dict, batch: dict, figures: dict,
               coef: float, timings: dict) -> tuple[dict, list[dict]]:
        """Phase 7: the step's metrics line and the samples it logs."""
        import torch

        spec = self.spec
        lengths = batch["completion_mask"].sum(1)
        raw = torch.tensor(scored["raw"])
        out = {"step": step, "reward_mean": float(raw.mean()), "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
               "score_mean": float(torch.tensor(scores, dtype=torch.float32).mean()),
               **{f"reward_{k}": sum(v) / len(v) for k, v in scored["parts"].items()},
               "kl_coef": coef, **figures, "response_length": float(lengths.float().mean()),
               "completions": len(scores), "tokens": int(lengths.sum()),
               "completions_per_s": len(scores) / timings["step_s"],
               "tokens_per_s": float(lengths.sum()) / timings["step_s"],
               "rollout_restarts": 0 if spec.rollout.colocate else self.rollout.restarts, "reward_restarts": self.reward.restarts,
               **{k: round(v, 4) for k, v in timings.items()}}
        samples = [{"step": step, "prompt": rollout["prompts"][i], "completion": rollout["texts"][i],
                    "reward": scored["raw"][i]} for i in range(min(spec.train.log_samples, len(scores)))]
        return out, samples

    def stop(self) -> None:
        """The actors and their reservation go (a driver that lives on, e.g. a notebook, keeps no CPUs)."""
        import ray

        for group in (self.policy, self.reference, self.critic, self.reward, self.rollout):
            for actor in (group.actors if group is not None else []):
                ray.kill(actor, no_restart=True)
        if self.placement is not None:
            self.placement.remove()

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self) -> str:
        """CHECKPOINTS/step_N: the policy's (and critic's) DeepSpeed state written by their actors
        straight to the run directory's storage, then controller.json, last: only a checkpoint
        with it is complete.  Older complete ones beyond `keep_checkpoints` and incomplete ones
        (cut short by a crash) are removed."""
        import ray

        root = storage.join(self.run_dir, CHECKPOINTS)
        final = storage.join(root, f"step_{self.step:06d}")
        storage.delete(final, self.cfg)  # an incomplete attempt at this step
        refs = self.policy.async_call("save", [(storage.join(final, "policy"), {"step": self.step})])
        if self.critic is not None:
            refs += self.critic.async_call("save", [(storage.join(final, "critic"), {"step": self.step})])
        ray.get(refs)
        state = {"step": self.step, "kl": self.kl.state_dict(), "moments": self.moments.state_dict(),
                 "config": resolved_dict(self.spec)}
        storage.write_text(storage.join(final, "controller.json"), json.dumps(state, indent=1), self.cfg)
        files = storage.list_files(root, self.cfg)
        names = sorted({f.split("/", 1)[0] for f in files})
        complete = sorted({f.split("/", 1)[0] for f in files if f.endswith("/controller.json") and f.count("/") == 1})
        for name in complete[:-self.spec.train.keep_checkpoints] + [n for n in names if n not in complete]:
            storage.delete(storage.join(root, name), self.cfg)
        return final


@contextlib.contextmanager
def _timed(timings: dict, key: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - t


def _history(uri: str, upto: int, cfg=None) -> list[dict]:
    return [m for m in storage.read_jsonl(uri, cfg) if m["step"] <= upto]


def _line(spec: RlhfSpec, m: dict) -> str:
    kl = f"  kl {m['kl']:.4f}" if "kl" in m else ""
    return (f"[rlhf] step {m['step']:>3}/{spec.train.steps}  reward {m['reward_mean']:+.3f}±{m['reward_std']:.3f}{kl}"
            f"  len {m['response_length']:.1f}  {m['step_s']:.1f} s (gen {m['generate_s']:.1f}, score {m['score_s']:.2f}, "
            f"ref {m['reference_s']:.1f}, train {m['train_s']:.1f}, sync {m['sync_s']:.2f})  "
            f"{m['completions_per_s']:.2f} completions/s")


def _train(controller: Controller, spec: RlhfSpec, progress) -> dict:
    """Steps from where the run stands to the end, then the export and the report."""
    from lmjobs.rlhf.report import write_report
    from lmjobs.trainer import _TensorBoard

    run_dir, cfg = controller.run_dir, controller.cfg
    metrics_path, samples_path = storage.join(run_dir, "metrics.jsonl"), storage.join(run_dir, "samples.jsonl")
    # a killed run may have logged steps past its last checkpoint: they are run again
    storage.write_jsonl(metrics_path, _history(metrics_path, controller.step, cfg), cfg)
    storage.write_jsonl(samples_path, _history(samples_path, controller.step, cfg), cfg)
    tensorboard = _TensorBoard(run_dir, spec, "rlhf")
    every = spec.train.checkpoint_every
    start_step = controller.step
    for step in range(controller.step + 1, spec.train.steps + 1):
        metrics, samples = controller.step_once(step)
        metrics["start_step"] = start_step
        storage.append_jsonl(metrics_path, [metrics], cfg)  # s3: one small object a step, not a rewrite
        storage.append_jsonl(samples_path, samples, cfg)
        tensorboard.log(metrics)
        progress(_line(spec, metrics))
        if (every and step % every == 0) or step == spec.train.steps:
            controller.checkpoint()
    tensorboard.close()
    export_dir = storage.join(run_dir, "policy")
    controller.policy.call("export", [(export_dir,)])
    storage.compact_jsonl(metrics_path, cfg)
    storage.compact_jsonl(samples_path, cfg)
    history = _history(metrics_path, spec.train.steps, cfg)
    report = write_report(spec, history, run_dir, cfg)
    return {"run_dir": run_dir, "metrics": metrics_path, "policy": export_dir,
            "checkpoint": latest_checkpoint(run_dir, cfg), "steps": spec.train.steps, "start_step": start_step,
            "info": controller.info, **report}


def run(spec: RlhfSpec, progress=print) -> dict:
    """The run to its end.  A role's actor lost for good (its node gone, or more deaths than its
    restarts) stops every role; they start again, placed anew, from the last complete checkpoint,
    at most train.max_failures times."""
    from lmjobs.rlhf.actors import LOST_ERRORS

    failures, restarts = 0, []
    while True:
        controller = Controller(spec, progress)  # everything checked before any cluster work
        try:
            controller.start()
            out = _train(controller, spec, progress)
            break
        except LOST_ERRORS as exc:
            failures += 1
            if failures > spec.train.max_failures:
                raise
            line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            saved = latest_checkpoint(controller.run_dir, controller.cfg)
            back_to = controller._saved(saved)["step"] if saved else 0
            restarts.append({"lost_at_step": controller.step + 1, "from_checkpoint_step": back_to,
                             "steps_lost": controller.step - back_to, "error": type(exc).__name__})
            progress(f"[rlhf] lost at step {controller.step + 1} ({type(exc).__name__}: {line}); every role starts "
                     f"again from the last checkpoint (step {back_to}): steps {back_to + 1}-{controller.step} run again, "
                     f"{controller.step - back_to} steps lost ({failures} of train.max_failures={spec.train.max_failures})")
        finally:
            controller.stop()
    out["restarts"] = restarts
    storage.write_text(storage.join(controller.run_dir, "summary.json"), json.dumps(out, indent=1), controller.cfg)
    return out


def summary(out: dict) -> list[str]:
    s = out["figures"]
    lines = [f"[rlhf] done: {out['steps']} steps (started at {out['start_step']}); reward {s['reward_first']:+.3f} "
             f"(first step) -> {s['reward_last_quarter']:+.3f} (mean of the last quarter)"]
    if s.get("kl_max") is not None:
        lines.append(f"  KL per token: max {s['kl_max']:.4f}, last {s['kl_last']:.4f} (target {s['kl_target']})")
    lines.append(f"  throughput: {s['completions_per_s']:.2f} completions/s, {s['tokens_per_s']:.1f} tokens/s; "
                 f"weight sync {s['sync_s']:.2f} s a step ({s['sync_mb']:.1f} MiB)")
    lines += [f"  policy (Hugging Face): {out['policy']}", f"  checkpoint: {out['checkpoint']}",
              f"  metrics: {out['metrics']}  (TensorBoard: {out['run_dir']}/tensorboard)",
              f"  curves: {out['curves']}", f"  samples: {out['run_dir']}/samples.jsonl"]
    return lines
