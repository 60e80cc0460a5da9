"""The deterministic pre-training data order (no Ray): every sample once an epoch, resumable
at any step, and the same global batches whatever the number of workers."""
import numpy as np

from lmjobs.pretrain.data import _read_visit, memory_chunks, plan

ROWS, SEQ = 2500, 4
BLOCKS = np.arange(ROWS * SEQ, dtype=np.int32).reshape(ROWS, SEQ)


def _rank_ids(rank, world, micro, accum, start_step, num_steps, seed=7):
    """The sample ids rank `rank` trains on, in order, as the workers' datasets deliver them."""
    chunks = memory_chunks(ROWS)
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
