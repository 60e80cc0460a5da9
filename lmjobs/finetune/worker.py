"""Ray Train adapter of `lmjobs finetune`: the rank's dataset shard, the task and checkpoints,
into the shared loop (lmjobs.loop.train)."""
from __future__ import annotations

from lmjobs.finetune import tasks
from lmjobs.config import FinetuneSpec
from lmjobs.loop import RayReporter, cpu_threads, measure_peak_tflops, train


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    spec = FinetuneSpec.model_validate(config["spec"])
    cpu_threads(spec)
    peak = spec.train.peak_tflops or measure_peak_tflops(spec.deepspeed.precision)  # before other threads start
    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    batches = shard.iter_batches(batch_size=spec.train.micro_batch_size, drop_last=True, batch_format="numpy")
    task = tasks.build(spec, config["info"], config["base_dir"], config["run_dir"])
    checkpoint = ray.train.get_checkpoint()
    args = (config["run_dir"], config["val"], config["data_start_step"], peak)
    if checkpoint is None:
        train(spec, task, batches, rank, RayReporter(), None, *args)
        return
    with checkpoint.as_directory() as directory:
        train(spec, task, batches, rank, RayReporter(), directory, *args)
