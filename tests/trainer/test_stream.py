"""PairStream: exact padded arrays, determinism, every row once per epoch, resume by skipping."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from mlx_dpo.pipeline.write import write_shard
from mlx_dpo.schemas import ref_logps_schema
from mlx_dpo.shapes import SCORE_MULTIPLE, SCORE_RATIO, WIDTH_MULTIPLE, WIDTH_RATIO, ladder
from mlx_dpo.trainer.stream import PairStream


def _rows(start, n):
    # Row i: prompt [i], chosen i%3+1 tokens, rejected 1 token; ref logps encode the index.
    return [
        {"index": i, "prompt_ids": [100 + i], "chosen_ids": [7] * (i % 3 + 1), "rejected_ids": [8],
         "ref_chosen_logps": -float(i), "ref_rejected_logps": -float(i) - 0.5,
         "n_chosen_tokens": i % 3 + 1, "n_rejected_tokens": 1,
         "ref_chosen_tail_logps": 0.0, "ref_rejected_tail_logps": 0.0}
        for i in range(start, start + n)
    ]


@pytest.fixture
def shards(tmp_path):
    schema = ref_logps_schema("test")
    paths = []
    for k, (start, n) in enumerate([(0, 7), (7, 6)]):
        rows = _rows(start, n)
        table = pa.table({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)
        write_shard(table, tmp_path / f"train/part-{k:05d}.parquet", tmp_path, row_group_rows=3)
        paths.append(tmp_path / f"train/part-{k:05d}.parquet")
    return paths


def _stream(shards, **kw):
    args = dict(batch_size=2, max_length=None, truncation_mode="keep_start", pad_id=0, seed=1,
                shuffle_buffer=4, pad_to_multiple=1)
    return PairStream(shards, **{**args, **kw})


def test_exact_padded_batch(shards):
    # Unshuffled: rows sorted by pair length; rows 0 and 3 are the shortest (chosen of 1 token).
    [batch] = next(iter(_stream(shards, shuffle=False).epoch(0)))
    np.testing.assert_array_equal(batch.indices, [0, 3])
    np.testing.assert_array_equal(batch.input_ids, [
        [100, 7],  # row 0: prompt [100], chosen [7]
        [103, 7],  # row 3: prompt [103], chosen [7]
        [100, 8],  # row 0: rejected [8]
        [103, 8],  # row 3: rejected [8]
    ])
    np.testing.assert_array_equal(batch.completion_mask, [[0, 1]] * 4)
    np.testing.assert_array_equal(batch.ref_chosen_logps, [-0.0, -3.0])
    np.testing.assert_array_equal(batch.ref_rejected_logps, [-0.5, -3.5])


def test_every_row_once_per_epoch_and_seeded(shards):
    stream = _stream(shards)
    for epoch in range(2):
        seen = Counter(int(i) for [b] in stream.epoch(epoch) for i in b.indices)
        assert seen == Counter(range(13))
    order = lambda s, e: [tuple(b.indices) for [b] in s.epoch(e)]  # noqa: E731
    assert order(stream, 0) == order(_stream(shards), 0)  # same seed, same order
    assert order(stream, 0) != order(stream, 1)  # epochs differ
    assert order(stream, 0) != order(_stream(shards, seed=2), 0)


def test_resume_continues_where_it_stopped(shards):
    full = [(e, tuple(b.indices)) for (e, [b]), _ in zip(_stream(shards).forever(), range(12))]
    resumed = [(e, tuple(b.indices)) for (e, [b]), _ in zip(_stream(shards).forever(0, skip_steps=5), range(7))]
    assert resumed == full[5:]


@pytest.mark.parametrize("fixed_rows", [False, True])
@pytest.mark.parametrize("ranks, micro_batches, batch_size", [(3, 1, 2), (2, 2, 2), (1, 3, 2), (4, 1, 3)])
def test_every_row_once_under_any_split(shards, ranks, micro_batches, batch_size, fixed_rows):
    """13 rows, global batches that do not divide them: the ranks' shares of every step hold every row
    of the epoch exactly once; every rank runs the same number of steps, a rank left without rows in
    a short last batch gets a stand-in row of weight 0 (with fixed rows, every share is filled up to
    batch_size pairs so)."""
    streams = [_stream(shards, rank=r, ranks=ranks, micro_batches=micro_batches, batch_size=batch_size,
                       fixed_rows=fixed_rows) for r in range(ranks)]
    for epoch in range(2):
        steps = [list(s.epoch(epoch)) for s in streams]
        assert len({len(rank_steps) for rank_steps in steps}) == 1
        trained = Counter(i for rank_steps in steps for step in rank_steps for b in step for i in b.real_indices())
        assert trained == Counter(range(13))
        for rank_steps in steps:
            assert all(len(step) == micro_batches for step in rank_steps)
            if fixed_rows:
                assert {len(b.indices) for step in rank_steps for b in step} == {batch_size}


def _distinct_lengths(tmp_path, n):
    """One shard of `n` rows whose chosen answers have lengths 1..n (row i: i + 1 tokens)."""
    schema = ref_logps_schema("test")
    rows = [{**row, "chosen_ids": [7] * (i + 1), "n_chosen_tokens": i + 1} for i, row in enumerate(_rows(0, n))]
    table = pa.table({f.name: [r[f.name] for r in rows] for f in schema}, schema=schema)
    write_shard(table, tmp_path / "part-00000.parquet", tmp_path, row_group_rows=4)
    return tmp_path / "part-00000.parquet"


@pytest.mark.parametrize("rows, batch_size", [(8, 2), (12, 3), (64, 4)])
def test_batches_change_between_epochs(tmp_path, rows, batch_size):
    """Rows of distinct lengths, all in one shuffle buffer, seeds 0..19, epochs 0..4: consecutive epochs
    share few batches (the length jitter must move rows by more than one global batch; by one, 8 rows
    at batch size 2 repeated 39 of these 80 epoch pairs exactly, sharing 69% of their batches). A random
    split shares ~14% (8 rows, batch 2); we allow at most 30%, and 2 identical epochs in 80."""
    shard = _distinct_lengths(tmp_path, rows)
    shared, identical = [], 0
    for seed in range(20):
        stream = _stream([shard], batch_size=batch_size, shuffle_buffer=4096, seed=seed)
        epochs = [{frozenset(b.indices.tolist()) for [b] in stream.epoch(e)} for e in range(5)]
        for a, b in zip(epochs, epochs[1:]):
            shared.append(len(a & b) / len(a))
            identical += a == b
    assert identical <= 2 and np.mean(shared) <= 0.3, (identical, np.mean(shared))


def _lengths_shard(tmp_path, n=2000, long_tail=False):
    """One shard of `n` rows of bench-like lengths (prompts ~N(64, 16) tokens, answers uniform 64..192;
    bench/tasks.py padding), or with `long_tail` log-uniform ones (prompts 16..512, answers 16..1024)."""
    rng = np.random.default_rng(3)
    schema = ref_logps_schema("test")
    rows = []
    for i in range(n):
        if long_tail:
            p, c, r = (int(x) for x in np.exp(rng.uniform(np.log([16, 16, 16]), np.log([512, 1024, 1024]))))
        else:
            p, c, r = int(np.clip(rng.normal(64, 16), 32, 96)) + 1, *(int(n) for n in rng.integers(65, 194, 2))
        rows.append({"index": i, "prompt_ids": [5] * p, "chosen_ids": [6] * c, "rejected_ids": [7] * r,
                     "ref_chosen_logps": -1.0, "ref_rejected_logps": -1.0, "n_chosen_tokens": c,
                     "n_rejected_tokens": r, "ref_chosen_tail_logps": 0.0, "ref_rejected_tail_logps": 0.0})
    table = pa.table({f.name: [row[f.name] for row in rows] for f in schema}, schema=schema)
    write_shard(table, tmp_path / "part-00000.parquet", tmp_path, row_group_rows=1024)
    return tmp_path / "part-00000.parquet"


def test_padding_stays_low(tmp_path):
    """Bench-like lengths: the shuffled epoch pads at most 1 point more than rows fully sorted by length
    (no shuffle), and far less than random batches."""
    shard = _lengths_shard(tmp_path)

    def waste(**kw) -> float:
        stream = _stream([shard], **{"batch_size": 4, "shuffle_buffer": 4096, **kw})
        ids = [b.input_ids for [b] in stream.epoch(0)]
        return 1 - sum(int((x != 0).sum()) for x in ids) / sum(x.size for x in ids)

    shuffled, ordered = waste(), waste(shuffle=False)
    assert ordered <= shuffled <= ordered + 0.01, (shuffled, ordered)
    assert shuffled < waste(shuffle_buffer=4, seed=5) - 0.05  # a 4-row buffer: batches of random lengths


def test_one_cache_keeps_its_order(shards):
    """The order one cache's epochs had before several caches could be mixed, pinned (taken from the
    code as it was): a run on one --cache trains exactly the batches it trained before."""
    assert [b.indices.tolist() for [b] in _stream(shards).epoch(0)] == [[2, 3], [0, 1], [4, 5], [7, 6], [11, 10], [9, 8], [12]]
    assert [b.indices.tolist() for [b] in _stream(shards).epoch(1)] == [[0, 2], [6, 1], [3, 5], [7, 4], [8, 9], [10, 11], [12]]
    steps = _stream(shards, micro_batches=2, shuffle_buffer=8).epoch(0)
    assert [[b.indices.tolist() for b in step] for step in steps] == [[[7, 0], [1, 5]], [[3, 2], [6, 4]], [[12, 8], [9, 11]], [[10], [10]]]


@pytest.mark.parametrize("long_tail, bound", [(False, 34), (True, 250)])
def test_few_compiled_shapes_per_run(tmp_path, long_tail, bound):
    """2,001 pairs in batches of 4 (the last one short), three epochs streamed as `mlx-dpo train` streams
    them: every width and scored-position count is a rung of its ladder (mlx_dpo.shapes), so the distinct
    input shapes the compiled step meets stay within `bound`; every micro-batch has the same rows, and
    each pair still trains once per epoch. Widths rounded to x32 and scored positions to x64, short
    batches as they came, met 38 shapes on the bench-like lengths and 623 on the long-tailed ones."""
    stream = PairStream([_lengths_shard(tmp_path, 2001, long_tail)], batch_size=4, max_length=None,
                        truncation_mode="keep_start", pad_id=0, seed=1, fixed_rows=True)
    shapes = set()
    for epoch in range(3):
        batches = [b for step in stream.epoch(epoch) for b in step]
        shapes |= {(b.input_ids.shape, b.plan.shape[1]) for b in batches}
        assert Counter(i for b in batches for i in b.real_indices()) == Counter(range(2001))
    assert len({rows for (rows, _), _ in shapes}) == 1
    widths, scored = {w for (_, w), _ in shapes}, {m for _, m in shapes}
    assert widths <= set(ladder(min(widths), max(widths), WIDTH_MULTIPLE, WIDTH_RATIO))
    assert scored <= set(ladder(min(scored), max(scored), SCORE_MULTIPLE, SCORE_RATIO))
    assert len(shapes) <= bound, len(shapes)


def test_short_batch_filled_with_weightless_copies(shards):
    """13 rows in batches of 2, fixed rows: the last batch holds its one pair and a copy of it of weight 0
    (its shortest pair: no wider than it was)."""
    [last] = list(_stream(shards, shuffle=False, fixed_rows=True).epoch(0))[-1]
    [alone] = list(_stream(shards, shuffle=False).epoch(0))[-1]
    assert alone.weights.tolist() == [1.0] and last.weights.tolist() == [1.0, 0.0]
    assert last.indices.tolist() == [alone.indices[0]] * 2 and last.input_ids.shape[1] == alone.input_ids.shape[1]
    np.testing.assert_array_equal(last.counts(), alone.counts())
