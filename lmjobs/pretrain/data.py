"""Deterministic data order for pre-training: which sample each rank sees at each step.

Ray Data's `streaming_split` hands blocks to whichever worker asks first, so the samples a rank
gets depend on timing, and a resumed run cannot tell what it already saw.  Here the order is a
pure function of (corpus, seed, step):

- the corpus is a list of chunks (a packed shard file, or a slice of an in-memory block array);
- epoch e visits the chunks in a permutation seeded by (seed, e), and the rows inside a chunk
  in a permutation seeded by (seed, e, chunk);
- the concatenated epochs form one stream; global step s trains on stream rows
  [s * G, (s + 1) * G) (G = global batch), and inside a step micro-batch j of the step goes to
  rank j % W, accumulation slot j // W.

Each rank gets its own Ray Dataset that streams just its rows from a start step on, reading the
chunks lazily (Ray Data, order preserved); resuming at step s is building the datasets from
position s * G.  Every row carries `sample_id`, its index in the corpus.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cluster import storage
from cluster.storage import StorageConfig

MEMORY_CHUNK_ROWS = 1024


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


def _read_visit(visit: dict, chunks: list[dict], seed: int, rank: int, world: int, micro: int,
                cfg: dict, memory: np.ndarray | None) -> pd.DataFrame:
    c = chunks[visit["chunk"]]
    if memory is not None:
        ids = memory[c["first_id"]:c["first_id"] + c["rows"]]
    else:
        import pyarrow.parquet as pq

        fs, local = storage.resolve(c["path"], StorageConfig.model_validate(cfg))
        ids = np.stack(pq.read_table(local, filesystem=fs, columns=["input_ids"]).column("input_ids").to_numpy(
            zero_copy_only=False))
    order = np.random.default_rng([seed, visit["epoch"], visit["chunk"]]).permutation(c["rows"])
    order = order[visit["skip"]:visit["skip"] + visit["take"]]
    positions = visit["stream_start"] + visit["skip"] + np.arange(visit["take"])
    mine = rank_rows(positions, rank, world, micro)
    rows = order[mine]
    return pd.DataFrame({"sample_id": (c["first_id"] + rows).astype(np.int64),
                         "input_ids": list(ids[rows].astype(np.int32))})


def rank_dataset(chunks: list[dict], seed: int, rank: int, world: int, micro: int, start_step: int,
                 num_steps: int, accum: int, cfg: StorageConfig | None, memory: np.ndarray | None = None,
                 num_cpus: float = 0.25):
    """Rank `rank`'s rows for steps [start_step, start_step + num_steps), in training order.
    num_cpus: each read task's CPU request (it must fit in what the Train workers leave free)."""
    import ray.data

    global_batch = micro * accum * world
    visits = plan(chunks, seed, start_step * global_batch, num_steps * global_batch)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the order is the contract
    return (ray.data.from_items(visits, override_num_blocks=max(1, min(len(visits), 64)))
            .map_batches(_read_visits, batch_size=1, batch_format="pandas", num_cpus=num_cpus,
                         fn_kwargs={"chunks": chunks, "seed": seed, "rank": rank, "world": world, "micro": micro,
                                    "cfg": (cfg or StorageConfig()).model_dump(), "memory": memory}))


def _read_visits(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
    frames = [_read_visit(v, **kwargs) for v in batch.to_dict("records")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"sample_id": [], "input_ids": []})
