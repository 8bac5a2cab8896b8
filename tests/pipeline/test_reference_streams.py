"""The precompute's forward layout: the same cached values, bit for bit, on one stream or two (each
at one BLAS thread), and equal to the plain computation to float rounding."""

import mlx.core as mx
import numpy as np

from mlx_dpo.logps import plain_sequence_logps, shared_lengths
from mlx_dpo.models import load_model
from mlx_dpo.pipeline.reference import batch_logps, sequence_width


def test_two_streams_give_the_values_of_one(tiny_model_dir):
    model = load_model(tiny_model_dir)
    rng = np.random.default_rng(0)
    ids = rng.integers(7, model.args.vocab_size, (6, sequence_width(30))).astype(np.int32)
    mask = np.zeros_like(ids)
    for i, (start, end) in enumerate([(4, 30), (3, 12), (5, 25), (2, 9), (8, 30), (6, 21)]):
        mask[i, start:end] = 1
        ids[i, end:] = 0  # padding after each sequence
    shared = shared_lengths(mask, 3)
    one = batch_logps(model, ids, mask, shared, streams=[None])
    two = batch_logps(model, ids, mask, shared, streams=[mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)])
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()  # bit for bit
    plain = plain_sequence_logps(model, mx.array(ids), mx.array(mask), shared)
    for a, b in zip(two, plain):
        np.testing.assert_allclose(a, np.array(b), rtol=1e-5, atol=1e-5)
