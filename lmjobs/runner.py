"""The Ray Train machinery every training kind shares (the registry of kinds is lmjobs.kinds).

- A training kind's `prepare` (spec -> `Prepared`: data read and checked, features built, no
  cluster and no writes, so a Tune campaign can reuse it across trials) names the `task` its
  workers build.  `launch(prepared, run_dir)` joins the cluster, checks that a resumed run is the
  same run, builds every rank's data stream and runs one `TorchTrainer` whose workers all enter
  `worker_loop`.
- Nothing here imports a feature package: the worker finds its spec class and task builder by
  the import paths `launch` puts in its config.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import warnings
from typing import Any, Callable

import yaml

from cluster import capacity, storage
from cluster.connect import connect, is_embedded
from cluster.spec import check_same, resolved_dict
from lmjobs.config import TrainJobSpec
from lmjobs.data_plan import rank_dataset

DATA_CPUS = 0.5  # kept free on a fixed-size cluster for Ray Data's read tasks
DATA_TASK_CPUS = 0.25  # what one read task asks for: below DATA_CPUS, or a task that needs a whole CPU never runs
# Passed to workers on any cluster: where the prebuilt DeepSpeed ops live, S3 endpoints.
FORWARDED_ENV = ("TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# What a resumed run must share with the run that wrote the checkpoint: the model, the data and
# its order (seed, global batch), and how the optimizer state is laid out.  Steps, logging,
# evaluation, learning rate and where it runs may change.
SAME_ON_RESUME = ("model", "data", "task", "multitask", "train.seed", "train.micro_batch_size",
                  "deepspeed.grad_accum", "deepspeed.zero_stage", "deepspeed.precision", "scaling.num_workers")


def resolve(path: str) -> Callable:
    """"module:function" -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# -- training kinds -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Prepared:
    """A training job ready to launch.  `spec` is resolved (e.g. fine-tuning's steps from epochs);
    `sources` and `weights_at` feed lmjobs.data_plan; `val` is held-out data the workers get
    in their config, or `val_dataset` a function building a Ray Dataset every worker reads
    (called after the cluster is joined); `payload` is what the kind's task builder needs, and
    `task` names that builder ("module:function", (spec, payload, rank, world, run_dir) -> (Task, val))."""

    spec: TrainJobSpec
    task: str
    sources: list[dict]
    weights_at: Callable[[int], Any]
    payload: dict
    info: dict = dataclasses.field(default_factory=dict)
    val: Any = None
    val_dataset: Callable[[], Any] | None = None
    group_by_length: int = 0


def run_root(spec: TrainJobSpec) -> str:
    root = spec.output.root
    return root if storage.is_remote(root) else str(pathlib.Path(root).expanduser().resolve())


def run_dir_of(spec: TrainJobSpec) -> str:
    return storage.join(run_root(spec), spec.name)


def check_cpu_headroom(total_cpus: float, num_workers: int, cpus_per_worker: float) -> None:
    """Train workers holding every CPU leave Ray Data none, and the run hangs: refuse that."""
    needed = num_workers * cpus_per_worker
    if needed > total_cpus - DATA_CPUS:
        raise RuntimeError(
            f"scaling: {num_workers} workers x {cpus_per_worker} CPU = {needed:g} CPUs on a cluster of "
            f"{total_cpus:g}; leave at least {DATA_CPUS:g} CPU for Ray Data (lower "
            f"scaling.cpus_per_worker, e.g. to {max(0.1, (total_cpus - DATA_CPUS) / num_workers):.2g})")


def resume_step(run_dir: str, cfg) -> int:
    """The step of the checkpoint Ray Train will hand the workers (0 if none): the newest one
    its checkpoint manager recorded, which it records only once every rank's files are stored,
    so a checkpoint cut short by a dying driver is never picked.  The data plan starts there."""
    name = _latest_checkpoint(run_dir, cfg)
    return int(name[len("checkpoint_step"):]) if name else 0


def _latest_checkpoint(run_dir: str, cfg) -> str | None:
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot, cfg):
        return None
    latest = (json.loads(storage.read_text(snapshot, cfg)).get("latest_checkpoint_result") or {})
    name = latest.get("checkpoint_dir_name") or ""
    if not name.startswith("checkpoint_step"):
        return None
    if not storage.exists(storage.join(run_dir, name, "train_state.json"), cfg):
        raise RuntimeError(f"{run_dir}/{name}: Ray Train records this checkpoint but its train_state.json is "
                           "missing; remove the run directory or restore the checkpoint")
    return name


def check_resume(spec: TrainJobSpec, run_dir: str) -> None:
    """A run directory with a checkpoint is resumed; refuse when the spec now describes another
    run (other data, batch, seed, model), naming the field, before any worker starts."""
    cfg = spec.output.storage
    name = _latest_checkpoint(run_dir, cfg)
    if name is None:
        return
    saved = json.loads(storage.read_text(storage.join(run_dir, name, "train_state.json"), cfg)).get("config") or {}
    check_same_run(saved, spec, f"{run_dir} holds a checkpoint at {name} of a run",
                   f"Give the run another name, or remove {run_dir} to start over")


def check_same_run(saved: dict, spec: TrainJobSpec, what: str, fix: str = "") -> None:
    """Refuse to continue a checkpoint (its resolved config `saved`) under a spec that describes
    another run, naming the first SAME_ON_RESUME field that differs."""
    check_same(saved, resolved_dict(spec), SAME_ON_RESUME, what, fix,
               lenient={"data": _only_allowed, "model": _only_allowed})


def _only_allowed(before: Any, after: Any) -> bool:
    """Within `data`: the held-out set's size and the evaluation limits may change on resume."""
    loose = ("val_blocks", "max_eval_examples", "eval_split", "eval_fraction")
    if not (isinstance(before, dict) and isinstance(after, dict)):
        return False
    return {k: v for k, v in before.items() if k not in loose} == {k: v for k, v in after.items() if k not in loose}


def _ray_data_actors_here() -> None:
    """Ray Data keeps two detached actors per cluster, its stats actor and its autoscaling
    coordinator, each pinned to the node of whoever first runs a dataset.  Here that would be a
    Train worker or a Tune trial, so an autoscaled worker node would host them and never count as
    idle (seen: a fake-multinode trainer node kept forever after a job, for each of the two).
    Create them from the driver, on the driver's node."""
    # private; ray pinned to 2.60.*
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    from ray.data._internal.stats import get_or_create_stats_actor

    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def _job_env_vars() -> dict:
    """The env vars of the Ray job this driver runs in (`lmjobs submit`), if any: Ray refuses a
    driver runtime_env that sets the same keys again."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return ((json.loads(raw).get("runtime_env") or {}).get("env_vars")) or {}


def join_cluster(address: str | None, num_cpus: int | None = None) -> dict:
    """Join (or start) the Ray cluster a job runs on, forwarding what its workers need."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in _job_env_vars()}
    joined = connect(address, num_cpus=num_cpus, runtime_env={"env_vars": env} if env else None)
    _ray_data_actors_here()
    # Ray Train V2 sends worker prints through its logger as well as to stdout (each line twice in
    # the driver's console) unless its print patch is off; these variables reach the workers
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if is_embedded():
        # nothing preempts a cluster on this machine; its watcher actor only logs a core-worker error
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Train's controller polls its workers every 2 s by default and takes each step of a run's
        # start and end at a poll: on one small machine a 0.5 s poll saves seconds a run (measured
        # here: 22 s -> 14 s for a two-run invariance test) for little load
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    return joined


def start(spec: TrainJobSpec, run_dir: str) -> None:
    """Join (or start) the Ray cluster, check CPU headroom and that a resumed run is the same run,
    save the resolved config: before any data work of a training job."""
    import ray
    import ray.data

    check_resume(spec, run_dir)
    joined = join_cluster(spec.scaling.address, spec.scaling.embedded_num_cpus)
    if joined["embedded"]:  # a fixed-size cluster; remote ones may autoscale
        check_cpu_headroom(ray.cluster_resources().get("CPU", 0.0), spec.scaling.num_workers,
                           spec.scaling.cpus_per_worker)
    storage.write_text(storage.join(run_dir, "resolved_config.yaml"),
                       yaml.safe_dump(resolved_dict(spec), sort_keys=False), spec.output.storage)
    # every dataset here executes inside the Train workers for the whole run; a progress bar
    # there (the held-out set's) redraws into the driver's log until the run ends
    ray.data.DataContext.get_current().enable_progress_bars = False


def launch(prepared: Prepared, run_dir: str | None = None, *, callbacks: tuple = (), init_from: str | None = None,
           checkpoint_score: tuple[str, str] | None = None):
    """Run a prepared training job to its end (resuming from the run dir's last checkpoint);
    returns Ray Train's result.

    callbacks: Ray Train user callbacks (a Tune trial relays reports through one).  init_from: a
    checkpoint of another run (local or s3:// URI) a run without checkpoints of its own starts
    from: weights, optimizer state and step (a PBT exploit); it must describe the same run.
    checkpoint_score: (metric, "max"|"min"): keep train.keep_checkpoints best by it, plus the latest."""

    spec = prepared.spec
    run_dir = run_dir or run_dir_of(spec)
    cfg = spec.output.storage
    start(spec, run_dir)
    first = min(resume_step(run_dir, cfg), spec.train.steps)
    if first == 0 and init_from is not None:
        state = json.loads(storage.read_text(storage.join(init_from, "train_state.json"), cfg))
        check_same_run(state.get("config") or {}, spec, f"{init_from} is a checkpoint of a run")
        first = min(int(state["step"]), spec.train.steps)
    else:
        init_from = None  # the run's own checkpoint wins: it continues past the one it started from
    world, micro, accum = spec.scaling.num_workers, spec.train.micro_batch_size, spec.deepspeed.grad_accum
    # one dataset a rank, in the deterministic order of lmjobs.data_plan
    datasets = {f"train_{rank}": rank_dataset(prepared.sources, prepared.weights_at, spec.train.seed, rank, world,
                                              micro, first, spec.train.steps - first, accum, cfg, DATA_TASK_CPUS,
                                              prepared.group_by_length)
                for rank in range(world)}
    if prepared.val_dataset is not None:
        datasets["val"] = prepared.val_dataset()  # every worker reads it from its start
    config = {"spec_class": f"{type(spec).__module__}:{type(spec).__qualname__}", "task": prepared.task,
              "spec": resolved_dict(spec), "run_dir": run_dir, "payload": prepared.payload,
              "val": prepared.val, "data_start_step": first, "init_from": init_from}
    return fit(spec, worker_loop, config, datasets, run_dir, callbacks=callbacks, checkpoint_score=checkpoint_score)


def worker_bundle(scaling) -> dict:
    """What one Train worker holds (its ScalingConfig resources_per_worker, plus its GPU)."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {}), **scaling.worker_resources}


def fit(spec: TrainJobSpec, loop, loop_config: dict, datasets: dict, run_dir: str, callbacks: tuple = (),
        checkpoint_score: tuple[str, str] | None = None):
    """One TorchTrainer run of `loop` (checkpoints in the run dir, restarts from the last one);
    returns Ray Train's result.  Every rank's datasets are its own: Ray splits nothing."""
    import ray.train
    from ray.train.torch import TorchTrainer

    root, name = run_dir.rsplit("/", 1)
    storage_path, filesystem = storage.train_storage(root, spec.output.storage)
    score = {} if checkpoint_score is None else {"checkpoint_score_attribute": checkpoint_score[0],
                                                   "checkpoint_score_order": checkpoint_score[1]}
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
            resources_per_worker=worker_bundle(spec.scaling)),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints, **score),
            failure_config=ray.train.FailureConfig(max_failures=spec.train.max_failures), callbacks=list(callbacks),
            # Ray Train's INFO lines (worker group start, every TrainingReport) drown the progress lines
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    if not is_embedded():  # a cluster given by address may have to grow first: a bounded wait
        capacity.wait_for([worker_bundle(spec.scaling)] * spec.scaling.num_workers,
                          timeout_s=spec.scaling.capacity_timeout_s, field="scaling.capacity_timeout_s",
                          what=f"{spec.scaling.num_workers} Train worker(s)",
                          hint="lower scaling.num_workers or scaling.cpus_per_worker, or add nodes")
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def checkpoint_uri(spec: TrainJobSpec, result) -> str | None:
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and storage.is_remote(run_root(spec)):
        checkpoint = "s3://" + checkpoint
    return checkpoint


def history(run_dir: str, cfg) -> list[dict]:
    """The run's logged metrics, its S3 append parts folded into metrics.jsonl first."""
    uri = storage.join(run_dir, "metrics.jsonl")
    storage.compact_jsonl(uri, cfg)
    return storage.read_jsonl(uri, cfg)


# -- inside each Train worker -------------------------------------------------------------------

def quiet_worker() -> None:
    """Warnings that say nothing to the person running the job (DeepSpeed's and torch's
    deprecation notices, repeated by every worker)."""
    import logging

    import torch

    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(deepspeed|torch|transformers)(\.|$)")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it fell back to CPU
    import ray.data  # noqa: F401  (configures its loggers on import: the levels are set after it)

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # each dataset's start, plan and end
    # "Reporting training result N: TrainingReport(...)" at every report: Ray Train V2 (2.60) logs it
    # through a logger named after its source file, which Train's LoggingConfig does not reach
    from ray.train.v2._internal.execution import context as train_context  # private; ray pinned to 2.60.*

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # we turn Ray Data's progress bars off on purpose (lmjobs.data_plan); it warns about that once a dataset
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" at every checkpoint
    # a fine-tune's base model always misses its new head: the load report says only that
    transformers.utils.logging.set_verbosity_error()


def _node_cpus() -> float | None:
    import ray

    node = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == node:
            return n["Resources"].get("CPU")
    return None


def worker_loop(config: dict) -> None:
    """The Ray Train entry point of every training kind: the spec, the rank's data stream, the
    kind's task and the checkpoint to resume from, into a `Trainer`."""
    import ray.train

    from lmjobs.trainer import RayReporter, Trainer, cpu_threads

    quiet_worker()
    spec = resolve(config["spec_class"]).model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cpu_threads(spec, context.get_local_world_size(), _node_cpus())
    task, val = resolve(config["task"])(spec, config["payload"], rank, world, config["run_dir"])
    if val is None:
        val = config["val"]
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = shard.iter_batches(batch_size=spec.train.micro_batch_size, drop_last=True, batch_format="numpy")
    trainer = Trainer(spec, task, rank, RayReporter(), config["run_dir"])
    checkpoint = ray.train.get_checkpoint()
    adopted = checkpoint is None and config.get("init_from") is not None
    if adopted:  # another run's checkpoint (a PBT donor's): this run continues from its state
        path, filesystem = storage.train_storage(config["init_from"], spec.output.storage)
        checkpoint = ray.train.Checkpoint(path, filesystem=filesystem)
    if checkpoint is None:
        trainer.setup(None)
    else:
        with checkpoint.as_directory() as directory:
            trainer.setup(directory)
    # an adopted state is scored before training on: the run's first line is the donor's model
    trainer.fit(batches, val, config["data_start_step"], evaluate_first=adopted)
