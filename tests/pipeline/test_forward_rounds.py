"""Precompute keeps every CPU stream busy on a small file (issue 13 item 4) without changing a value.

Each sequence is scored at a width of its own length, in batches of one width, so the 8 sequences of
the bench's 4 pairs make 6 batches, 5 of one row. Before rounds, each batch was one forward cut into a part
per stream, so a one-row batch ran on one stream (one core). Now consecutive batches' parts share a
forward (a round), a stream each, within the batch's memory bounds. Values: test_batch_invariance.py.
"""

import mlx.core as mx
import numpy as np
import pytest

import tiny_models
from mlx_dpo.models import load_model
from mlx_dpo.pipeline.reference import forward_rounds, score_rows, sequence_width, width_batches

# The 8 sequence lengths of the bench's 4 step pairs (bench/variants.py _id_pairs(4, 64, 128, 32000, 2)).
BENCH_LENGTHS = (175, 184, 232, 150, 191, 182, 224, 197)


def test_a_small_file_gives_every_stream_work_in_every_round():
    widths = [sequence_width(n) for n in BENCH_LENGTHS]
    # before rounds: 6 forwards, 5 of them one row on one stream
    assert [len(b) for b in width_batches(widths, 8192)] == [1, 1, 1, 3, 1, 1]
    for streams, parts in ((2, [2, 2, 2, 1]), (3, [3, 3, 2]), (8, [8])):  # 7, 8, 8 parts
        assert [len(r) for r in forward_rounds(widths, 8192, streams)] == parts, streams
    # 400 tokens a round: widths 241 and 229 alone, then 205 + 193, 193 + 193, 181 + 157
    assert [len(r) for r in forward_rounds(widths, 400, 2)] == [1, 1, 2, 2, 2]


def round_tokens(parts, widths) -> int:
    return sum(len(part) * widths[part[0]] for part in parts)


@pytest.mark.parametrize("seed", range(6))
def test_rounds_run_the_batches_parts_within_a_batchs_bounds(seed):
    rng = np.random.default_rng(seed)
    widths = [sequence_width(int(n)) for n in rng.integers(2, 300, int(rng.integers(1, 80)))]
    tokens_per_batch, streams = int(rng.choice([1, 100, 500, 2048])), int(rng.integers(1, 5))
    rounds = forward_rounds(widths, tokens_per_batch, streams)
    batches = width_batches(widths, tokens_per_batch)
    # the parts are those one batch per forward ran: each batch cut into min(streams, rows) near-equal parts
    parts = [p.tolist() for b in batches for p in np.array_split(np.array(b), min(streams, len(b)))]
    assert [part for r in rounds for part in r] == parts
    for r, after in zip(rounds, rounds[1:] + [None]):
        assert 1 <= len(r) <= streams
        assert all(len({widths[s] for s in part}) == 1 for part in r)
        # memory: a round holds no more padded tokens than a batch may (one wide row alone, as before)
        assert round_tokens(r, widths) <= tokens_per_batch or len(r) == 1
        # a stream is left idle only when the parts run out or the next would pass the token bound
        assert after is None or len(r) == streams or round_tokens(r + after[:1], widths) > tokens_per_batch
    if streams == 1:
        assert rounds == [[b] for b in batches]  # one stream: a batch per forward, as before


def test_score_rows_runs_a_small_file_in_rounds_on_every_stream(tiny_model_dir):
    model = load_model(tiny_model_dir)
    rows = tiny_models.small_file_ids(model.args.vocab_size)
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    settings = dict(max_length=None, truncation_mode="keep_start", pad_id=0, tokens_per_batch=8192)
    scored = list(score_rows(model, rows, streams=streams, **settings))
    # a yield per forward: 8 one-row batches on 2 streams in 4 forwards (8 before rounds)
    assert [tokens for _, _, tokens in scored] == [96 + 84, 72 + 60, 48 + 36, 24 + 12]
    assert sorted(i for done, _, _ in scored for i in done) == list(range(len(rows)))
