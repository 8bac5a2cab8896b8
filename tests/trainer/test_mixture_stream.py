"""Several caches in one stream (train --cache A --cache B --cache-weights ...): what each epoch draws
from each cache, in which seeded order, and that nothing is lost or drawn twice within a cache's pass."""

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from mlx_dpo.pipeline.write import write_shard
from mlx_dpo.schemas import ref_logps_schema
from mlx_dpo.trainer.mixture import MIX_TAG, epoch_quotas, mixed_rows
from mlx_dpo.trainer.stream import ROW_COLUMNS, PairStream, iter_rows

SIZES = (13, 8)  # cache A: two shards of 7 and 6 rows; cache B: one shard of 8; row groups of 3


def _cache(root, rows: int, shard_rows: int):
    schema = ref_logps_schema("test")
    paths = []
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        table = pa.table({
            "index": list(range(start, start + n)), "prompt_ids": [[100 + i] for i in range(start, start + n)],
            "chosen_ids": [[7] * (i % 3 + 1) for i in range(start, start + n)], "rejected_ids": [[8]] * n,
            "ref_chosen_logps": [-float(i) for i in range(start, start + n)], "ref_rejected_logps": [-0.5] * n,
            "n_chosen_tokens": [i % 3 + 1 for i in range(start, start + n)], "n_rejected_tokens": [1] * n,
            "ref_chosen_tail_logps": [0.0] * n, "ref_rejected_tail_logps": [0.0] * n,
        }, schema=schema)
        paths.append(root / f"train/part-{k:05d}.parquet")
        write_shard(table, paths[-1], root, row_group_rows=3)
    return paths


@pytest.fixture
def caches(tmp_path):
    return [_cache(tmp_path / "a", SIZES[0], 7), _cache(tmp_path / "b", SIZES[1], 8)]


def _stream(caches, **kw):
    args = dict(batch_size=2, max_length=None, truncation_mode="keep_start", pad_id=0, seed=1, shuffle_buffer=6,
                pad_to_multiple=1)
    return PairStream(caches, **{**args, **kw})


def _drawn(stream, epoch) -> list[tuple[int, int]]:
    """(cache, index) of every real pair of an epoch's steps, all ranks' shares of this stream."""
    return [(int(c), int(i)) for step in stream.epoch(epoch) for b in step
            for c, i, w in zip(b.caches, b.indices, b.weights) if w > 0]


def test_weights_give_their_share_of_every_epoch(caches):
    """0.7/0.3 over 21 rows: every epoch draws round(0.7 x 21) = 15 pairs from A and 6 from B (within
    one pair of the weights' shares, whatever the epoch), and B's 8 rows come back in passes: over 4
    epochs (24 draws = 3 passes) each of its rows exactly 3 times."""
    stream = _stream(caches, weights=[0.7, 0.3])
    total = sum(SIZES)
    draws = [_drawn(stream, e) for e in range(4)]
    for epoch in draws:
        counts = Counter(c for c, _ in epoch)
        assert len(epoch) == total
        assert abs(counts[0] - 0.7 * total) < 1 and abs(counts[1] - 0.3 * total) < 1, counts
    assert Counter(i for epoch in draws for c, i in epoch if c == 1) == {i: 3 for i in range(SIZES[1])}
    # A (60 draws over 13 rows): 4 whole passes, each row at least 4 and at most 5 times
    assert set(Counter(i for epoch in draws for c, i in epoch if c == 0).values()) <= {4, 5}


def test_default_weights_are_a_concatenation(caches):
    """No --cache-weights: each epoch holds every row of every cache exactly once, in a seeded order."""
    stream = _stream(caches)
    every = Counter((c, i) for c, n in enumerate(SIZES) for i in range(n))
    assert [Counter(_drawn(stream, e)) for e in range(3)] == [every] * 3
    assert _drawn(stream, 0) == _drawn(_stream(caches), 0)  # the same seed, the same order
    assert _drawn(stream, 0) != _drawn(stream, 1)
    assert _drawn(stream, 0) != _drawn(_stream(caches, seed=2), 0)


def test_the_seeded_interleave(caches):
    """The order rows enter the shuffle buffer: which cache each of an epoch's rows comes from is the
    seeded permutation [seed, MIX_TAG, 0, epoch] of the quotas (README: One cache, many experiments), and
    each cache continues its own order where the previous epoch left it."""
    quotas = epoch_quotas(list(SIZES), [0.7, 0.3])
    assert quotas == [15, 6]
    rows = {e: list(mixed_rows(caches, list(SIZES), quotas, 1, e, ROW_COLUMNS, iter_rows)) for e in range(3)}
    for epoch, drawn in rows.items():
        expected = np.random.default_rng([1, MIX_TAG, 0, epoch]).permutation(np.repeat([0, 1], quotas))
        assert [r["cache"] for r in drawn] == expected.tolist()
    b = [r["index"] for e in range(3) for r in rows[e] if r["cache"] == 1]  # 18 draws: 2 passes and 2 rows
    assert sorted(b[:8]) == sorted(b[8:16]) == list(range(8)) and b[:8] != b[8:16]
    again = list(mixed_rows(caches, list(SIZES), quotas, 1, 2, ROW_COLUMNS, iter_rows))  # epoch 2 on its own
    assert [(r["cache"], r["index"]) for r in again] == [(r["cache"], r["index"]) for r in rows[2]]


@pytest.mark.parametrize("ranks, micro_batches", [(2, 1), (1, 2), (3, 1)])
def test_split_over_ranks_the_same_pairs(caches, ranks, micro_batches):
    """Ranks and micro-batches share each global batch; together they draw what one process draws,
    and each batch's pairs_per_cache counts its real pairs by cache."""
    whole = Counter(_drawn(_stream(caches, weights=[1, 3], batch_size=4), 0))
    shares = Counter()
    for rank in range(ranks):
        stream = _stream(caches, weights=[1, 3], batch_size=4 // (ranks * micro_batches) or 1, rank=rank, ranks=ranks,
                         micro_batches=micro_batches)
        for step in stream.epoch(0):
            for b in step:
                assert b.pairs_per_cache.tolist() == [float(sum((b.caches == c) & (b.weights > 0))) for c in (0, 1)]
        shares += Counter(_drawn(stream, 0))
    assert shares == whole  # the epoch's rows do not depend on the global batch
    assert sum(shares.values()) == sum(SIZES) and Counter(c for c, _ in shares.elements()) == {0: 5, 1: 16}


def test_evaluation_reads_every_cache_once(caches):
    """Unshuffled (evaluation): the caches one after the other, every row once, named by cache."""
    drawn = _drawn(_stream(caches, shuffle=False), 0)
    assert Counter(drawn) == Counter((c, i) for c, n in enumerate(SIZES) for i in range(n))


@pytest.mark.parametrize("ranks, micro_batches, batch_size", [(1, 1, 4), (2, 1, 2), (1, 2, 3), (3, 1, 2)])
def test_weightless_fillers_count_for_no_cache(caches, ranks, micro_batches, batch_size):
    """With fixed rows (train's compiled step: every micro-batch filled up to batch_size pairs with copies
    of weight 0), 21 pairs that no global batch divides: each batch's pairs_per_cache counts only its
    pairs of weight 1, and over all ranks an epoch's add up to the 15 + 6 pairs it trains."""
    totals = np.zeros(2)
    for rank in range(ranks):
        stream = _stream(caches, weights=[0.7, 0.3], batch_size=batch_size, rank=rank, ranks=ranks,
                         micro_batches=micro_batches, fixed_rows=True)
        for step in stream.epoch(0):
            for b in step:
                assert len(b.indices) == batch_size
                assert b.pairs_per_cache.tolist() == [float(sum((b.caches == c) & (b.weights > 0))) for c in (0, 1)]
                totals += b.pairs_per_cache
    assert totals.tolist() == [15, 6]
