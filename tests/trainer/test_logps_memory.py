"""Memory above the body of the log-prob pass where the chunk size fills the budget (compiled) and with a
trainable tied head (review break C)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from test_logps_chunked import tiny

from mlx_dpo.logps import sequence_logps


@pytest.mark.parametrize("vocab", [20_000, 50_000])
def test_memory_above_the_body_within_the_budget_with_a_trainable_tied_head(vocab):
    """Stated (logps.chunk_positions, README, test_logps_chunked): the log-prob memory above the body stays
    within the chunk budget for any V, with and without gradients. What happens: with the tied embedding
    trainable (full fine-tuning), _token_terms's backward keeps one (V, D) head gradient per chunk alive
    (leaf_grads summed lazily), so the extra peak grows with the number of chunks: 70 MB at V = 20,000
    (76 MB at LIVE_CHUNK_ARRAYS = 12), 217 MB at 50,000, 331 MB at 75,000 against a 32 MB budget.
    Same measurement as test_memory_above_the_body_stays_within_the_chunk_budget, only nothing frozen."""
    budget = 32 * 2**20  # chunks of 12 positions: 43 chunks over 510 positions at V >= 50,000
    head_grad = vocab * 32 * 4  # one (V, D) float32 array: the head's gradient, and its running sum
    model = tiny(llama, True, vocab=vocab, hidden=32)
    ids = mx.random.randint(0, vocab, (2, 256), key=mx.random.key(0)).astype(mx.int32)
    mask = mx.ones_like(ids)

    def extra_peak(fn) -> int:
        mx.eval(ids, mask)
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    grad = lambda fn: nn.value_and_grad(model, lambda m: fn(m).sum())(model)  # noqa: E731
    body = extra_peak(lambda: grad(lambda m: m.model(ids[:, :-1])))
    ours = extra_peak(lambda: grad(lambda m: sequence_logps(m, ids, mask, budget=budget)[0]))
    # the head's gradient is a few (V, D) arrays (running sum, a chunk's term, the embedding's): 4-6 measured;
    # one per chunk (43 here) before the backward waited for the running sum
    assert ours - body <= budget + 8 * head_grad, f"{(ours - body) / 2**20:.0f} MB above the body, budget {budget / 2**20:.0f} MB"


def test_compiled_memory_above_the_body_within_the_budget_when_the_chunk_fills_it():
    """Stated (logps.chunk_positions, README, test_logps_chunked): log-prob memory above the body within the
    chunk budget for any V, with and without gradients, inside mx.compile. What happens: at V = 25,880 with a
    32 MB budget, budget // (9 x 4 x V) = 36 is a whole number of tiles, so the chunk (36 positions) makes 9
    chunk-sized arrays exactly the budget; compiled, the pass holds ~9 of them plus its small arrays: 32.4 MB
    forward, 33.4 MB with gradients (at LIVE_CHUNK_ARRAYS = 12, chunks of 24: 20.5 MB). Not compiled it stays at
    27 MB, which is why test_logps_chunked's (uncompiled, V = 16k/32k) peak test passes. The same at V = 19,400,
    38,800 and 77,600 (chunks of 48, 24, 12)."""
    import numpy as np

    from mlx_dpo.logps import score_plan

    vocab, budget = 25_880, 32 * 2**20
    model = tiny(llama, True, vocab=vocab, hidden=32)
    ids = mx.random.randint(0, vocab, (2, 256), key=mx.random.key(0)).astype(mx.int32)
    mask, shared = mx.ones_like(ids), mx.array([5, 5])
    plan = mx.array(score_plan(np.asarray(mask)))
    model.freeze()
    model.model.layers[0].unfreeze()
    grad = lambda fn: nn.value_and_grad(model, fn)(model)  # noqa: E731
    body = mx.compile(lambda i: grad(lambda m: m.model(i[:, :-1]).sum()))
    ours = mx.compile(lambda i, k, p, s: grad(lambda m: sum(x.sum() for x in sequence_logps(m, i, k, s, p, budget=budget))))

    def extra_peak(fn) -> int:
        fn()  # compiled once outside the measurement
        mx.eval(ids, mask, plan, shared)
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    extra = extra_peak(lambda: ours(ids, mask, plan, shared)) - extra_peak(lambda: body(ids))
    assert extra <= budget, f"{extra / 2**20:.1f} MB above the body, budget {budget / 2**20:.0f} MB"
