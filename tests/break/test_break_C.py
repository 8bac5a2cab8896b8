"""Review break C: inputs where the stated behaviour of aa9dcb5 (LIVE_CHUNK_ARRAYS 12 -> 9) or 07b8b2f
(the s3 clean-up's manifest re-read) fails. Each test is expected to FAIL on main as it stands."""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))
from test_logps_chunked import tiny  # noqa: E402

from mlx_dpo.logps import sequence_logps  # noqa: E402


def test_memory_above_the_body_within_the_budget_with_a_trainable_tied_head():
    """Stated (logps.chunk_positions, README, test_logps_chunked): the log-prob memory above the body stays
    within the chunk budget for any V, with and without gradients. What happens: with the tied embedding
    trainable (full fine-tuning), _token_terms's backward keeps one (V, D) head gradient per chunk alive
    (leaf_grads summed lazily), so the extra peak grows with the number of chunks: 70 MB at V = 20,000
    (76 MB at LIVE_CHUNK_ARRAYS = 12), 217 MB at 50,000, 331 MB at 75,000 against a 32 MB budget.
    Same measurement as test_memory_above_the_body_stays_within_the_chunk_budget, only nothing frozen."""
    vocab, budget = 50_000, 32 * 2**20  # chunks of 12 positions: 43 chunks over 510 positions
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
    assert ours - body <= budget, f"{(ours - body) / 2**20:.0f} MB above the body, budget {budget / 2**20:.0f} MB"
