"""Memory above the body of the log-prob pass where the chunk size fills the budget (compiled) and with a
trainable tied head (review break C)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from test_logps_chunked import extra_peak, tiny

from mlx_dpo.logps import sequence_logps


@pytest.mark.parametrize("vocab", [20_000, 50_000])
def test_memory_above_the_body_within_the_budget_with_a_trainable_tied_head(vocab):
    """With the tied embedding trainable (full fine-tuning), the log-prob memory above the body is the chunk
    budget plus the head's gradient, a few (V, D) arrays: the backward walks the chunks after the running sum
    of that gradient. Review break C: it kept one (V, D) per chunk alive, 70 MB at V = 20,000 and 217 MB at
    50,000 against a 32 MB budget. The measurement of test_memory_above_the_body_stays_within_the_chunk_budget,
    only nothing frozen."""
    budget = 32 * 2**20  # chunks of 12 positions: 43 chunks over 510 positions at V >= 50,000
    head_grad = vocab * 32 * 4  # one (V, D) float32 array: the head's gradient, and its running sum
    model = tiny(llama, True, vocab=vocab, hidden=32)
    ids = mx.random.randint(0, vocab, (2, 256), key=mx.random.key(0)).astype(mx.int32)
    mask = mx.ones_like(ids)

    grad = lambda fn: nn.value_and_grad(model, lambda m: fn(m).sum())(model)  # noqa: E731
    body = extra_peak(lambda: grad(lambda m: m.model(ids[:, :-1])), ids, mask)
    ours = extra_peak(lambda: grad(lambda m: sequence_logps(m, ids, mask, budget=budget)[0]), ids, mask)
    # the head's gradient is a few (V, D) arrays (running sum, a chunk's term, the embedding's): 4-6 measured;
    # one per chunk (43 here) before the backward waited for the running sum
    assert ours - body <= budget + 8 * head_grad, f"{(ours - body) / 2**20:.0f} MB above the body, budget {budget / 2**20:.0f} MB"


def test_compiled_memory_above_the_body_within_the_budget_when_the_chunk_fills_it():
    """Compiled, with gradients, log-prob memory above the body stays within the chunk budget where the chunk
    fills it exactly. Review break C: at LIVE_CHUNK_ARRAYS = 9, V = 25,880 and a 32 MB budget give chunks of 36
    positions, 9 of them the whole budget, and the compiled pass held 33.4 MB (32.4 MB forward; 27 MB not
    compiled, which test_logps_chunked's uncompiled peak test at V = 16k/32k cannot see); at 12, 20.5 MB."""
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

    inputs = (ids, mask, plan, shared)
    extra = extra_peak(lambda: ours(*inputs), *inputs, warm=True) - extra_peak(lambda: body(ids), *inputs, warm=True)
    assert extra <= budget, f"{extra / 2**20:.1f} MB above the body, budget {budget / 2**20:.0f} MB"
