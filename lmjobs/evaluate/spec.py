"""The eval spec (`kind: eval`) and in-context task definitions.

An eval run scores one or more models (HF directories, lmjobs exports or checkpoints, `pkg:`
models, or every checkpoint of a run) on any of: perplexity sets, in-context (zero/few-shot)
tasks, the task metrics of fine-tuned heads, and fixed-seed generation samples.

A task definition is a small YAML file (`lmjobs/evaluate/tasks/NAME.yaml` ships SST-2, RTE,
MRPC and XQuAD); a user's own is any path.  Its data fields are checked against the data before
any cluster work, so a template naming an unknown field or a label without a verbaliser fails
with the field in the message.
"""
from __future__ import annotations

import pathlib
import string
from typing import Literal

import pydantic
from pydantic import Field

from cluster.spec import JobSpec, Section, _describe, read_yaml
from cluster.storage import StorageConfig

TASKS_DIR = pathlib.Path(__file__).parent / "tasks"


class TaskData(Section):
    path: str
    format: Literal["csv", "tsv", "json", "jsonl", "squad"]


class TaskDef(Section):
    """How one in-context task turns records into prompts and how answers are scored.

    classification: `label_field`'s value -> its verbaliser, scored by the log-likelihood of each
    verbaliser after the prompt.  multiple_choice: the choices listed in `choices_field` (a list
    per record), the right one at `answer_field` (its index, or its text).  short_answer: the
    model generates up to `max_new_tokens`, cut at the first `stop`; exact match and token F1
    against `answer_field` (a string or a list of accepted answers).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    kind: Literal["classification", "multiple_choice", "short_answer"]
    eval: TaskData  # the records scored
    demos: TaskData | None = None  # where k-shot demonstrations come from (default: eval, never the scored row)
    instruction: str = ""  # once, before the demonstrations
    template: str  # a record -> its prompt: Python format fields name the record's fields
    target: str = " {answer}"  # how the answer follows the prompt (in demonstrations, and what is scored)
    separator: str = "\n\n"  # between demonstrations and before the scored prompt
    label_field: str | None = None  # classification
    verbalizers: dict[str, str] | None = None  # classification: label value -> the words scored
    choices_field: str | None = None  # multiple_choice
    answer_field: str | None = None  # multiple_choice (index or text) / short_answer (text or list)
    normalize: Literal["none", "tokens", "chars"] = "none"  # log-likelihood per continuation token / char
    max_new_tokens: int = Field(16, ge=1, le=512)  # short_answer
    stop: list[str] = ["\n"]  # short_answer: the answer ends at the first of these

    @pydantic.model_validator(mode="after")
    def _kind_fields(self):
        need = {"classification": ("label_field", "verbalizers"), "multiple_choice": ("choices_field", "answer_field"),
                "short_answer": ("answer_field",)}[self.kind]
        for name in need:
            if not getattr(self, name):
                raise ValueError(f"a {self.kind} task needs {name}")
        for name, text in (("template", self.template), ("target", self.target), ("instruction", self.instruction)):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
            except ValueError as exc:
                raise ValueError(f"{name}: {exc} (write {{{{ and }}}} for literal braces)") from None
            if name == "target" and any(f != "answer" for f in fields):
                raise ValueError("target: only {answer} may appear in it")
            if name == "instruction" and fields:
                raise ValueError("instruction: no fields may appear in it (write {{ and }} for literal braces)")
        if "{answer}" not in self.target:
            raise ValueError("target: must contain {answer}")
        return self

    def template_fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]


class IclSection(Section):
    models: list[str] | None = None  # names of models entries this section scores (default: every one it applies to)
    task: str  # a shipped task's name (sst2, rte, mrpc, xquad) or the path of a task YAML
    shots: list[int] = Field([0], min_length=1)  # k demonstrations per prompt, one result per k
    limit: int | None = Field(None, ge=1)  # only the first N eval records (lm-eval's --limit); null: all
    num_examples: int | None = Field(None, ge=1)  # a seeded sample of the eval records (after limit; null: all)
    seed: int = 0  # picks the sample and every prompt's demonstrations
    balanced: bool = False  # demonstrations spread evenly over the labels (classification, multiple_choice)
    # true: one seeded draw of demonstrations for every record (HELM's way); their common prompt
    # prefix is then run once per forward batch instead of once per record
    shared_demos: bool = False
    max_context: int | None = Field(None, ge=16)  # tokens; longer prompts lose their oldest tokens (default: model's)

    @pydantic.field_validator("shots")
    @classmethod
    def _shots(cls, shots: list[int]) -> list[int]:
        if any(k < 0 or k > 64 for k in shots):
            raise ValueError("each k must be between 0 and 64")
        if len(set(shots)) != len(shots):
            raise ValueError(f"repeated k in {shots}")
        return shots


class PerplexitySection(Section):
    """Held-out text (txt: one text per blank-line-separated paragraph, or the whole file with
    `whole_file`; jsonl: a `text` field) tokenised by each model's tokenizer, or packed shards
    (`lmjobs data prepare` output, whose token ids are the pre-trained model's)."""

    models: list[str] | None = None  # names of models entries this section scores (default: every one it applies to)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    path: str  # a .txt / .jsonl file, or a prepared data directory (manifest.json + shards)
    split: str = "val"  # packed shards: which split
    whole_file: bool = False  # txt: the file is one text (e.g. a book) instead of paragraphs
    max_texts: int | None = Field(None, ge=1)  # the first N texts (or packed sequences)
    max_tokens: int | None = Field(None, ge=1)  # stop after this many scored tokens
    window: int | None = Field(None, ge=8)  # tokens a forward pass sees (default: 1024, at most the model's context)
    stride: int | None = Field(None, ge=1)  # new tokens scored per window after the first (default: window / 2)

    @pydantic.model_validator(mode="after")
    def _stride_fits(self):
        if self.window and self.stride and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


class TaskMetricsSection(Section):
    """A fine-tuned head (classification / tokens / QA) on an ingested dataset's split."""

    models: list[str] | None = None  # names of models entries this section scores (default: every one it applies to)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    data: str  # an `lmjobs data ingest` directory
    split: str = "dev"
    max_examples: int | None = Field(None, ge=1)
    max_seq_len: int = Field(128, ge=8)
    doc_stride: int = Field(64, ge=1)  # QA windows


class SamplesSection(Section):
    models: list[str] | None = None  # names of models entries this section scores (default: every one it applies to)
    prompts: list[str] = Field(min_length=1)
    seeds: list[int] = [0]  # one sample per prompt and seed
    max_new_tokens: int = Field(40, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0)  # 0: greedy
    top_k: int = Field(40, ge=0)


class JudgeSection(Section):
    """A reward model judges each candidate's completion against the baseline's, prompt by prompt
    (lmjobs.evaluate.judge): win rate with its 95 % interval, rewards, KL per token, lengths."""

    reward_model: str  # a `task: preference` export, scored with its training encoding
    baseline: str  # a models entry name (e.g. the SFT policy)
    candidates: list[str] | None = None  # models entry names (default: every other one)
    kl_reference: str | None = None  # the models entry the KL is measured to (default: the baseline)
    prompts: str  # .txt (one a line), .jsonl / .parquet with `prompt`, or an ingested dataset (train split)
    skip_prompts: int = Field(0, ge=0)  # held out: skip the first N (e.g. those the training saw)
    max_prompts: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(256, ge=1)  # longer prompts keep their end
    chat_template: bool = True  # each prompt as a user turn where the tokenizer has a chat template
    max_new_tokens: int = Field(48, ge=1, le=1024)
    # sampling from the full distribution (no top-k / top-p): at 1.0 the KL is the policies' own
    temperature: float = Field(1.0, gt=0)
    seed: int = 0
    show: int = Field(8, ge=0)  # prompts shown side by side in the report


class ModelEntry(Section):
    """One model: `path` (HF dir, export, checkpoint dir, `pkg:NAME`), or `run` (every
    checkpoint of a training run, compared across steps)."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    path: str | None = None
    run: str | None = None

    @pydantic.model_validator(mode="after")
    def _one(self):
        if (self.path is None) == (self.run is None):
            raise ValueError("give exactly one of path, run")
        return self


class ComputeSection(Section):
    num_actors: int = Field(1, ge=1, le=256)  # model replicas in the Ray Data actor pool
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    # torch threads in each actor; null: the cluster's CPUs over the actors (2 for 1 actor on 2 cores).
    # Fix it to get bit-identical scores between runs with different actor counts.
    threads_per_actor: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)  # sequences per forward pass
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: faster on CPUs with AVX-512 BF16 and on GPUs
    # how long the run waits for room for its actors (an autoscaler booting nodes) before failing
    # with what is missing; the default covers a cloud node's boot
    capacity_timeout_s: float = Field(900.0, gt=0)


class EvalOutput(Section):
    root: str = "runs"  # the report lands in ROOT/NAME/
    storage: StorageConfig = StorageConfig()


class EvalSpec(JobSpec):
    kind: Literal["eval"] = "eval"
    models: list[ModelEntry] = Field(min_length=1)
    perplexity: list[PerplexitySection] = []
    icl: list[IclSection] = []
    task_metrics: list[TaskMetricsSection] = []
    samples: SamplesSection | None = None
    judge: JudgeSection | None = None
    compute: ComputeSection = ComputeSection()
    address: str | None = None  # a Ray cluster (default: the embedded local one)
    output: EvalOutput = EvalOutput()

    @pydantic.model_validator(mode="after")
    def _something_to_do(self):
        if not (self.perplexity or self.icl or self.task_metrics or self.samples or self.judge):
            raise ValueError("nothing to evaluate: give at least one of perplexity, icl, task_metrics, samples, judge")
        named = {m.name for m in self.models if m.name}
        if self.judge:
            j = self.judge
            for field, names in (("baseline", [j.baseline]), ("candidates", j.candidates or []),
                                 ("kl_reference", [j.kl_reference] if j.kl_reference else [])):
                for n in names:
                    if n not in named:
                        raise ValueError(f"judge.{field}: {n!r} is not the name of a models entry "
                                         f"(named: {', '.join(sorted(named)) or 'none; give models[].name'})")
            if len(named - {j.baseline}) == 0 and not j.candidates:
                raise ValueError("judge.candidates: no model to compare with the baseline; name another models entry")
        sections = [(f"{what}[{i}]", sec) for what in ("icl", "perplexity", "task_metrics")
                    for i, sec in enumerate(getattr(self, what))] + ([("samples", self.samples)] if self.samples else [])
        for where, sec in sections:
            for n in sec.models or []:
                if n not in named:
                    raise ValueError(f"{where}.models: {n!r} is not the name of a models entry "
                                     f"(named: {', '.join(sorted(named)) or 'none; give models[].name'})")
        for what, names in (("perplexity", [p.name for p in self.perplexity]),
                            ("task_metrics", [t.name for t in self.task_metrics])):
            if len(set(names)) != len(names):
                raise ValueError(f"{what}: names must be distinct (got {names})")
        return self


def selects(section, model_name: str) -> bool:
    """Whether a section scores this model: no `models` list, or the model's entry is in it (a
    `run` entry's checkpoints are named ENTRY@STEP)."""
    return section.models is None or any(model_name == n or model_name.startswith(n + "@") for n in section.models)


def task_path(task: str) -> pathlib.Path:
    """A shipped task's file, or the user's task file."""
    shipped = TASKS_DIR / f"{task}.yaml"
    if "/" not in task and not task.endswith((".yaml", ".yml")) and shipped.exists():
        return shipped
    path = pathlib.Path(task).expanduser()
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in TASKS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"task {task}: neither a shipped task ({known}) nor a task file")
    return path


def load_task(task: str) -> TaskDef:
    """The task definition, validated; a problem names the file and the field."""
    from cluster.spec import SpecError

    path = task_path(task)
    try:
        return TaskDef.model_validate(read_yaml(path))
    except pydantic.ValidationError as exc:
        raise SpecError(str(path), [_describe(TaskDef, e) for e in exc.errors()]) from None
