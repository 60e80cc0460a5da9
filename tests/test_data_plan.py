"""The deterministic pre-training data order (no Ray): every sample once an epoch, resumable
at any step, and the same global batches whatever the number of workers."""
import numpy as np
import pandas as pd

from lmjobs.data_plan import _visit_rows, memory_chunks, plan, rank_rows


def chunks_of(rows: int, size: int = 1024) -> list[dict]:
    """The corpus as several chunks (like packed shards): plans visit them in a seeded order."""
    return [{"path": "", "rows": min(size, rows - s), "first_id": s} for s in range(0, rows, size)]

ROWS, SEQ = 2500, 4
BLOCKS = np.arange(ROWS * SEQ, dtype=np.int32).reshape(ROWS, SEQ)


def _read_visit(visit: dict, chunks: list[dict], seed: int, rank: int, world: int, micro: int,
                cfg: dict, memory: np.ndarray | None) -> pd.DataFrame:
    """Reference: rank `rank`'s rows of one visit, straight from the single-stream plan."""
    rows, ids = _visit_rows(visit, chunks, seed, cfg, memory)
    positions = visit["stream_start"] + visit["skip"] + np.arange(visit["take"])
    mine = rank_rows(positions, rank, world, micro)
    return pd.DataFrame({"sample_id": rows[mine].astype(np.int64), "input_ids": list(ids[mine].astype(np.int32))})


def _rank_ids(rank, world, micro, accum, start_step, num_steps, seed=7):
    """The sample ids rank `rank` trains on, in order, as the workers' datasets deliver them."""
    chunks = chunks_of(ROWS)
    g = micro * accum * world
    ids = []
    for visit in plan(chunks, seed, start_step * g, num_steps * g):
        frame = _read_visit(visit, chunks, seed, rank, world, micro, {}, BLOCKS)
        assert all((row // SEQ == sid) for row, sid in zip(np.stack(frame["input_ids"])[:, 0], frame["sample_id"]))
        ids += frame["sample_id"].tolist()
    return ids


def _global_steps(world, micro, accum, start_step, num_steps):
    """Per step, the set of sample ids all ranks train on."""
    per_rank = [_rank_ids(r, world, micro, accum, start_step, num_steps) for r in range(world)]
    per_step = micro * accum
    return [sorted(i for r in per_rank for i in r[s * per_step:(s + 1) * per_step]) for s in range(num_steps)]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    steps = _global_steps(world=2, micro=5, accum=2, start_step=0, num_steps=250)  # 20 ids a step: 2 epochs
    flat = [i for s in steps for i in s]
    assert sorted(flat[:ROWS]) == list(range(ROWS)) and sorted(flat[ROWS:]) == list(range(ROWS))
    assert flat[:ROWS] != flat[ROWS:]


def test_resume_mid_epoch_is_the_exact_suffix():
    full = [_rank_ids(r, 2, 4, 3, 0, 130) for r in range(2)]
    resumed = [_rank_ids(r, 2, 4, 3, 77, 53) for r in range(2)]  # 77 * 24 rows in: inside epoch 0
    for r in range(2):
        assert resumed[r] == full[r][77 * 12:]


def test_one_worker_sees_the_same_global_batches_as_two():
    one = _global_steps(world=1, micro=8, accum=2, start_step=0, num_steps=40)
    two = _global_steps(world=2, micro=8, accum=1, start_step=0, num_steps=40)
    assert one == two


# --- weighted mixing and curriculum stages (lmjobs.data_plan.segments / read_segment) ---

from lmjobs.config import DataSection  # noqa: E402
from lmjobs.data_plan import read_segment, segments  # noqa: E402

SMALL = np.arange(700 * SEQ, dtype=np.int32).reshape(700, SEQ) + 10**6  # a second source, other tokens


def _sources():
    return [{"name": "big", "chunks": chunks_of(ROWS), "memory": BLOCKS, "id_offset": 0},
            {"name": "small", "chunks": chunks_of(700, 256), "memory": SMALL, "id_offset": ROWS}]


def _mixed_ids(data: DataSection, sources, rank, world, micro, accum, start_step, num_steps, per_segment=5):
    g = micro * accum * world

    def weights_at(step):
        return np.asarray(data.weights_at(step), dtype=np.float64)

    ids = []
    for item in segments(sources, weights_at, 7, start_step, num_steps, g, per_segment):
        frame = read_segment(item, sources, 7, rank, world, micro, {})
        for sid, row in zip(frame["sample_id"], frame["input_ids"]):  # ids name the rows they carry
            src = 0 if sid < ROWS else 1
            expect = (BLOCKS if src == 0 else SMALL)[sid - sources[src]["id_offset"]]
            assert (row == expect).all()
        ids += frame["sample_id"].tolist()
    return ids


def test_single_source_segments_equal_the_visit_plan():
    data = DataSection()
    for rank in range(2):
        assert _mixed_ids(data, _sources()[:1], rank, 2, 4, 3, 0, 60) == _rank_ids(rank, 2, 4, 3, 0, 60)


def test_mixture_follows_weights_and_each_source_its_own_epochs():
    data = DataSection.model_validate({"mixture": [{"name": "big", "source": "a", "weight": 1},
                                                   {"name": "small", "source": "b", "weight": 3}]})
    ranks = [_mixed_ids(data, _sources(), r, 2, 4, 2, 0, 150) for r in range(2)]
    # back into stream order: micro-batch j of a step is rank j % 2, accumulation slot j // 2
    ids = [i for s in range(150) for j in range(4) for i in ranks[j % 2][s * 8 + (j // 2) * 4:s * 8 + (j // 2) * 4 + 4]]
    assert len(ids) == 2400
    small = [i for i in ids if i >= ROWS]
    assert abs(len(small) / len(ids) - 0.75) < 0.03
    first_epoch = small[:700]  # the small source wraps around: its first 700 draws are one permutation
    assert sorted(first_epoch) == list(range(ROWS, ROWS + 700))
    big = [i for i in ids if i < ROWS]
    assert len(set(big)) == len(big)  # not yet through one epoch of the big source: no repeats


def test_curriculum_stages_switch_sources_and_resume_exactly():
    data = DataSection.model_validate({
        "mixture": [{"name": "big", "source": "a"}, {"name": "small", "source": "b"}],
        "stages": [{"until_step": 20, "weights": {"small": 1}}, {"weights": {"big": 1, "small": 1}}]})
    full = _mixed_ids(data, _sources(), 0, 1, 8, 1, 0, 60)
    assert all(i >= ROWS for i in full[:20 * 8])  # stage 1: only the small source
    later = full[20 * 8:]
    assert 0.35 < sum(i < ROWS for i in later) / len(later) < 0.65
    # resuming at step 33 (inside stage 2) replays exactly the rest of the uninterrupted order
    assert _mixed_ids(data, _sources(), 0, 1, 8, 1, 33, 27, per_segment=4) == full[33 * 8:]
    for rank in range(2):
        two = _mixed_ids(data, _sources(), rank, 2, 4, 1, 0, 60)
        assert two == [i for s in range(60) for i in full[s * 8 + rank * 4:s * 8 + rank * 4 + 4]]


def test_raw_text_blocks_are_windows_at_seeded_offsets():
    """In-memory raw text: each epoch trains block i on a window starting 0..L-1 tokens after the
    block's own start (wrapping at the stream's end), drawn per epoch and block: the same ids as
    the aligned blocks, reproducible, and at every alignment."""
    chunks, seed, flat = chunks_of(ROWS), 7, BLOCKS.reshape(-1)
    offsets = {0: [], 1: []}
    for visit in plan(chunks, seed, 0, 2 * ROWS):
        rows, ids = _visit_rows(visit, chunks, seed, {}, BLOCKS, shift_blocks=True)
        again = _visit_rows(visit, chunks, seed, {}, BLOCKS, shift_blocks=True)
        aligned = _visit_rows(visit, chunks, seed, {}, BLOCKS)
        assert np.array_equal(rows, aligned[0]) and np.array_equal(ids, again[1])
        shift = (ids[:, 0].astype(np.int64) - rows * SEQ) % flat.size  # BLOCKS holds each token's position
        assert np.all(shift < SEQ)
        assert np.array_equal(ids, flat[(rows[:, None] * SEQ + shift[:, None] + np.arange(SEQ)) % flat.size])
        offsets[visit["epoch"]] += list(zip(rows.tolist(), shift.tolist()))
    for epoch in (0, 1):
        assert set(s for _, s in offsets[epoch]) == set(range(SEQ))  # every alignment
    assert dict(offsets[0]) != dict(offsets[1])  # drawn afresh each epoch


def test_in_memory_text_is_one_chunk_shuffled_as_a_whole():
    """Raw text fits in memory: one chunk, so a step's blocks come from all over the corpus."""
    assert memory_chunks(15_685) == [{"path": "", "rows": 15_685, "first_id": 0}]
    rows, _ = _visit_rows(plan(memory_chunks(ROWS), 7, 0, 12)[0], memory_chunks(ROWS), 7, {}, BLOCKS)
    assert rows.max() - rows.min() > ROWS // 2  # 12 blocks of one step spread over the corpus
