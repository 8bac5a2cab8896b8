"""Padding-free rows (mlx_dpo.padding_free): the body run on each row alone, at its own width, scores
what the padded batch scores: values, token counts, LD-DPO tails and gradients against the padded path
and the plain full-logits oracle, on tiny models of each architecture, eager and compiled."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2
from test_logps_chunked import ARCHITECTURES, batch, close, tiny

from mlx_dpo.logps import plain_sequence_logps, score_plan, sequence_logps
from mlx_dpo.padding_free import row_index, row_widths, rows_body


def test_row_widths_stop_at_the_last_scored_token():
    mask = np.array([[0, 0, 1, 1, 0, 0],  # token 3 is predicted at position 2: 3 positions
                     [0, 1, 1, 1, 1, 1],  # token 5 at position 4: all 5
                     [0, 0, 0, 0, 0, 0]])  # nothing scored: the first rung
    assert row_widths(mask, 1) == (3, 5, 1)
    assert row_widths(mask, 4) == (4, 5, 4)  # rounded up, never past the 5 positions the padded path runs
    assert row_widths(mask, 2, 2.0) == (4, 5, 2)  # the ladder 2, 4, 8: capped at 5


def test_row_index_maps_padded_positions_to_the_concatenated_rows():
    # rows of widths 3 and 2 out of length 5: padded flat position 5 (row 1, column 0) is concatenated position 3
    index = row_index(mx.array([0, 2, 5, 6, 9]), (3, 2), 5)
    assert index.tolist() == [0, 2, 3, 4, 4]  # the last (row 1, column 4): a weight-0 filler, clamped


@pytest.mark.parametrize("module,tied", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("multiple", [1, 8])
def test_values_counts_and_tails_equal_the_padded_path(module, tied, multiple):
    model = tiny(module, tied)
    ids, mask = batch()
    widths = row_widths(np.array(mask), multiple)
    assert sum(widths) < mask.shape[0] * (mask.shape[1] - 1)  # fewer positions than the padded batch runs
    shared = mx.array([3, 9, 1, 20, 0, 7])
    rows = sequence_logps(model, ids, mask, shared, widths=widths)
    padded = sequence_logps(model, ids, mask, shared)
    plain = plain_sequence_logps(model, ids, mask, shared)
    for ours, *oracles in zip(rows, padded, plain):
        for oracle in oracles:
            ok, worst = close(ours, oracle)
            assert ok, worst
    assert np.array(rows[1]).tolist() == np.array(plain[1]).tolist()


def test_rows_of_one_width_share_a_forward_with_the_same_values():
    """Rows 0 and 2 get one width: one forward of 2 rows; each row's hidden states equal its own forward."""
    model = tiny(llama, False)
    ids, _ = batch()
    widths = (16, 20, 16, 12, 20, 8)
    hidden = rows_body(model, ids[:, :-1], widths)
    start = 0
    for row, width in enumerate(widths):
        alone = model.model(ids[row : row + 1, :width])[0]
        assert float(mx.abs(hidden[start : start + width] - alone).max()) <= 1e-5
        start += width
    assert hidden.shape[0] == sum(widths)


@pytest.mark.parametrize("module,tied", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_gradients_equal_the_padded_path(module, tied):
    """Every parameter trainable (head and tied embedding included), within 1e-5 of the largest."""
    model = tiny(module, tied)
    ids, mask = batch()
    widths = row_widths(np.array(mask), 8)

    def grads(**kw):
        loss = lambda m: (sequence_logps(m, ids, mask, **kw)[0] * mx.arange(1, 7)).sum()  # noqa: E731
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    rows, padded = grads(widths=widths), grads()
    assert rows.keys() == padded.keys()
    for name in padded:
        scale = float(mx.abs(padded[name]).max())
        assert float(mx.abs(rows[name] - padded[name]).max()) <= 1e-5 * scale + 1e-9, name


def test_compiled_values_and_gradients_with_weightless_plan_columns():
    """As the train step runs it: inside mx.compile, the widths a constant of the trace, a plan of the
    trainer's ladder (weight-0 columns) from the host."""
    model = tiny(qwen2, True)
    ids, mask = batch()
    plan = mx.array(score_plan(np.array(mask), multiple=64))
    assert int(plan[2].sum()) < plan.shape[1]
    widths = row_widths(np.array(mask), 8)

    def step(i, k, p, w):
        loss = lambda m: (sequence_logps(m, i, k, plan=p, widths=w)[0] * mx.arange(1, 7)).sum()  # noqa: E731
        return nn.value_and_grad(model, loss)(model)

    (value, grads) = mx.compile(step)(ids, mask, plan, widths)
    (plain_value, plain_grads) = step(ids, mask, plan, None)
    assert abs(value.item() - plain_value.item()) <= 1e-5 * abs(plain_value.item())
    grads, plain_grads = dict(tree_flatten(grads)), dict(tree_flatten(plain_grads))
    for name in plain_grads:
        scale = float(mx.abs(plain_grads[name]).max())
        assert float(mx.abs(grads[name] - plain_grads[name]).max()) <= 1e-5 * scale + 1e-9, name


def test_refused_for_an_architecture_not_checked():
    from mlx_lm.models import gpt2

    model = gpt2.Model(gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
                                      layer_norm_epsilon=1e-5, vocab_size=50))
    ids, mask = batch(vocab=50)
    with pytest.raises(ValueError, match="padding-free"):
        sequence_logps(model, ids, mask, widths=row_widths(np.array(mask)))



def test_packed_rows_are_refused():
    """Plain rows only: review break7 found widths= taking precedence over segments= without a word,
    the packed row then run under plain causal attention (one sequence attending to the one before it),
    1.42 nats off the padded values."""
    from test_packing import packed, pairs

    model = tiny(llama, False)
    p = packed(pairs(), width=32)
    widths = row_widths(np.array(p["completion_mask"]))
    with pytest.raises(ValueError, match="plain rows"):
        sequence_logps(model, mx.array(p["input_ids"]), mx.array(p["completion_mask"]), plan=mx.array(p["plan"]),
                       segments=mx.array(p["segments"]), sequences=8, widths=widths)
