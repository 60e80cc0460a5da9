"""Deterministic data order for every training kind (pre-training, fine-tuning, trials): which
sample each rank sees at each step.

Ray Data's `streaming_split` hands blocks to whichever worker asks first, so the samples a rank
gets depend on timing, and a resumed run cannot tell what it already saw.  Here the order is a
pure function of (corpus, seed, step):

- the corpus is a list of chunks (a packed shard file, or a slice of an in-memory block array);
- epoch e visits the chunks in a permutation seeded by (seed, e), and the rows inside a chunk
  in a permutation seeded by (seed, e, chunk);
- the concatenated epochs form one stream; global step s trains on stream rows
  [s * G, (s + 1) * G) (G = global batch), and inside a step micro-batch j of the step goes to
  rank j % W, accumulation slot j // W.

Weighted mixing of several sources: each source has its own stream as above; the G slots of
step s are drawn from the sources by a multinomial with the step's weights (seeded by (seed, s);
the weights may change by step: ordered curriculum stages), shuffled, and each source fills its
slots from its own stream in order.  A source's stream position at step s is the sum of its
draws before s, so the whole order is still a pure function of (sources, seed, step).

Each rank gets its own Ray Dataset that streams just its rows from a start step on, reading the
chunks lazily (Ray Data, order preserved, a segment of steps per task); resuming at step s is
building the datasets from position s * G.  Every row carries `sample_id`, its index in the
corpus (sources numbered one after another).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd

from cluster import storage
from cluster.storage import StorageConfig

# In-memory blocks (raw text) are shuffled across this many rows at once: one chunk for any corpus
# that fits, so a batch's blocks come from all over the text, not from one 64 KB stretch of it
# (local shuffles left lmjobs 0.05 nats behind i.i.d. windows on B1).
MEMORY_CHUNK_ROWS = 1 << 20


def file_chunks(paths: list[str], cfg: StorageConfig | None) -> list[dict]:
    """One chunk per packed shard: {path, rows, first_id}; sample ids number the rows in order."""
    import pyarrow.parquet as pq

    chunks, first = [], 0
    for path in paths:
        fs, local = storage.resolve(path, cfg)
        rows = pq.read_metadata(local, filesystem=fs).num_rows
        chunks.append({"path": path, "rows": rows, "first_id": first})
        first += rows
    return chunks


def memory_chunks(num_rows: int) -> list[dict]:
    return [{"path": "", "rows": min(MEMORY_CHUNK_ROWS, num_rows - s), "first_id": s}
            for s in range(0, num_rows, MEMORY_CHUNK_ROWS)]


def plan(chunks: list[dict], seed: int, start_row: int, num_rows: int) -> list[dict]:
    """The chunk visits covering stream rows [start_row, start_row + num_rows), in order:
    {chunk, epoch, stream_start (stream position of the visit's first row), skip, take}."""
    total = sum(c["rows"] for c in chunks)
    if total == 0:
        raise ValueError("the training set is empty")
    visits, end = [], start_row + num_rows
    for epoch in range(start_row // total, math.ceil(end / total)):
        order = np.random.default_rng([seed, epoch]).permutation(len(chunks))
        pos = epoch * total
        for k in order:
            c = chunks[k]
            lo, hi = max(pos, start_row), min(pos + c["rows"], end)
            if lo < hi:
                visits.append({"chunk": int(k), "epoch": epoch, "stream_start": pos, "skip": lo - pos, "take": hi - lo})
            pos += c["rows"]
    return visits


def rank_rows(stream_positions: np.ndarray, rank: int, world: int, micro: int) -> np.ndarray:
    """Mask of the stream rows that belong to `rank`: micro-batch j of the stream goes to j % W."""
    return (stream_positions // micro) % world == rank


def _visit_rows(visit: dict, chunks: list[dict], seed: int, cfg: dict, memory: np.ndarray | dict | None,
                shift_blocks: bool = False):
    """(row index in the source, token ids) of one visit, in stream order; for in-memory labelled
    features (a dict of equally long arrays), (row index, {column: rows of that column}).

    shift_blocks (in-memory raw text only): block i of an epoch is the window that starts a seeded
    0..L-1 tokens after block i's own start (one draw per epoch and block; the last block wraps to
    the stream's start), so every epoch sees windows at every alignment, as nanoGPT's random
    windows do, while each block id is still trained on once per epoch."""
    c = chunks[visit["chunk"]]
    order = np.random.default_rng([seed, visit["epoch"], visit["chunk"]]).permutation(c["rows"])
    order = order[visit["skip"]:visit["skip"] + visit["take"]]
    rows = c["first_id"] + order
    if isinstance(memory, dict):  # labelled features: one array per column, a row per example
        return rows, {name: column[rows] for name, column in memory.items()}
    if memory is not None:
        width = memory.shape[1]
        if not shift_blocks:
            return rows, memory[rows]
        jitter = np.random.default_rng([seed, 0x6A6974, visit["epoch"], visit["chunk"]]).integers(width, size=c["rows"])
        flat = memory.reshape(-1)
        starts = rows * width + jitter[order]
        return rows, flat[(starts[:, None] + np.arange(width)) % flat.size]
    import pyarrow.parquet as pq

    fs, local = storage.resolve(c["path"], StorageConfig.model_validate(cfg))
    ids = np.stack(pq.read_table(local, filesystem=fs, columns=["input_ids"]).column("input_ids").to_numpy(
        zero_copy_only=False))
    return rows, ids[order]


def source_seed(seed: int, source: int) -> int:
    return seed if source == 0 else seed + 1_000_003 * source


def step_sources(weights: np.ndarray, seed: int, step: int, global_batch: int) -> np.ndarray:
    """Which source fills each of the step's G slots (weights of the step, one per source)."""
    if len(weights) == 1:
        return np.zeros(global_batch, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x6D6978, step])
    counts = rng.multinomial(global_batch, weights / weights.sum())
    return rng.permutation(np.repeat(np.arange(len(weights)), counts))


def mixture_labels(weights_at, num_sources: int, seed: int, start_step: int, num_steps: int,
                   global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of every slot of steps [start, start + num_steps), each source's stream position at
    the start step).  weights_at(step) -> the weights in force at that step."""
    if num_sources == 1:
        return np.zeros(num_steps * global_batch, np.int64), np.array([start_step * global_batch])
    before = np.zeros(num_sources, np.int64)
    for step in range(start_step):
        before += np.bincount(step_sources(weights_at(step), seed, step, global_batch), minlength=num_sources)
    labels = [step_sources(weights_at(step), seed, step, global_batch)
              for step in range(start_step, start_step + num_steps)]
    return np.concatenate(labels), before


def segments(sources: list[dict], weights_at, seed: int, start_step: int, num_steps: int,
             global_batch: int, steps_per_segment: int) -> list[dict]:
    """The work items of a run from start_step: per segment of steps, the slots' sources and,
    per source, the visits of its own stream that fill them."""
    labels, position = mixture_labels(weights_at, len(sources), seed, start_step, num_steps, global_batch)
    items = []
    for first in range(0, num_steps, steps_per_segment):
        seg = labels[first * global_batch:(first + steps_per_segment) * global_batch]
        per_source = []
        for d, src in enumerate(sources):
            n = int((seg == d).sum())
            visits = plan(src["chunks"], source_seed(seed, d), int(position[d]), n) if n else []
            per_source.append(visits)
            position[d] += n
        items.append({"start_row": (start_step + first) * global_batch, "labels": seg.tolist(), "visits": per_source})
    return items


def _idle_backoff_base():
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    return ExecutionCallback


class IdleBackoff(_idle_backoff_base()):
    """Ray Data's scheduling loop blocks in `ray.wait` on running tasks, but when backpressure
    leaves none running (the consumer — a training step — is slower than the reads) it spins:
    measured here, each rank's executor thread held the GIL ~80 % of the time inside its Train
    worker and training ran 5x slower.  Sleeping 10 ms on such idle steps makes it cheap."""

    def on_execution_step(self, executor) -> None:
        topology = getattr(executor, "_topology", None) or {}
        if not any(op.num_active_tasks() for op in topology):
            time.sleep(0.01)


def rank_dataset(sources: list[dict], weights_at, seed: int, rank: int, world: int, micro: int, start_step: int,
                 num_steps: int, accum: int, cfg: StorageConfig | None, num_cpus: float = 0.25,
                 group_by_length: int = 0):
    """Rank `rank`'s rows for steps [start_step, start_step + num_steps), in training order.

    sources: [{chunks, memory (in-memory blocks or None), id_offset}], one per mixed source;
    weights_at(step) -> numpy weights.  num_cpus: each read task's CPU request (it must fit in
    what the Train workers leave free).  group_by_length: see read_segment."""
    import ray.data

    global_batch = micro * accum * world
    per_segment = max(1, min(num_steps, -(-4096 // global_batch)))
    items = segments(sources, weights_at, seed, start_step, num_steps, global_batch, per_segment)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the contract
    # the executor of a rank's dataset runs inside its Train worker for the whole run: its
    # progress bars cost that worker's CPU (and the driver's log) at every scheduling step
    ctx.enable_progress_bars = False
    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, IdleBackoff]
    # one JSON string a segment: Ray Data's Arrow conversion leaves it as it is
    rows = [{"segment": json.dumps(item)} for item in items]
    return (ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 64)))
            .map_batches(_read_segments, batch_size=1, batch_format="pandas", num_cpus=num_cpus,
                         fn_kwargs={"sources": sources, "seed": seed, "rank": rank, "world": world, "micro": micro,
                                    "cfg": (cfg or StorageConfig()).model_dump(), "group_by_length": group_by_length}))


def read_segment(item: dict, sources: list[dict], seed: int, rank: int, world: int, micro: int,
                 cfg: dict, group_by_length: int = 0) -> pd.DataFrame:
    """Rank `rank`'s rows of one segment, in stream order: sample_id plus the sources' columns
    (`input_ids` for token blocks; every column of in-memory labelled features).

    group_by_length > 0 (features with a `length` column): inside each run of that many of the
    rank's micro-batches the rows are sorted by length, so a micro-batch holds rows of similar
    length and padding costs little; still a pure function of (sources, seed, step)."""
    labels = np.asarray(item["labels"])
    sample_ids = np.zeros(len(labels), np.int64)
    columns: dict[str, list] = {}
    for d, (src, visits) in enumerate(zip(sources, item["visits"])):
        parts = [_visit_rows(v, src["chunks"], source_seed(seed, d), cfg, src.get("memory"),
                              src.get("shift_blocks", False)) for v in visits]
        if not parts:
            continue
        slots = iter(np.flatnonzero(labels == d))
        sample_ids[labels == d] = src.get("id_offset", 0) + np.concatenate([p[0] for p in parts])
        for rows, values in parts:
            values = values if isinstance(values, dict) else {"input_ids": values}
            for k, slot in zip(range(len(rows)), slots):
                for name, column in values.items():
                    columns.setdefault(name, [None] * len(labels))[slot] = column[k]
    mine = np.flatnonzero(rank_rows(item["start_row"] + np.arange(len(labels)), rank, world, micro))
    if group_by_length and "length" in columns:
        width = micro * group_by_length
        lengths = np.asarray([columns["length"][i] for i in mine])
        mine = np.concatenate([mine[lo:lo + width][np.argsort(lengths[lo:lo + width], kind="stable")]
                               for lo in range(0, len(mine), width)] or [mine])
    frame = {"sample_id": sample_ids[mine]}
    for name, values in columns.items():
        frame[name] = [values[i] for i in mine]
    if "input_ids" in frame:
        frame["input_ids"] = [np.asarray(v, dtype=np.int32) for v in frame["input_ids"]]
    return pd.DataFrame(frame)


def _read_segments(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
    frames = [read_segment(json.loads(text), **kwargs) for text in batch["segment"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"sample_id": [], "input_ids": []})
