"""The scored-positions, chunked log-prob path against the plain computation over full logits
(`plain_sequence_logps`, the oracle), on tiny random models of each architecture we run it for."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2, qwen3

from mlx_dpo.logps import (
    LIVE_CHUNK_ARRAYS,
    ROW_TILE,
    _token_terms,
    chunk_positions,
    lm_head,
    plain_sequence_logps,
    score_plan,
    sequence_logps,
)

VOCAB = 300


def tiny(module, tied: bool, vocab: int = VOCAB, hidden: int = 64, seed: int = 1):
    args = dict(model_type=module.__name__.rsplit(".", 1)[1], hidden_size=hidden, num_hidden_layers=2,
                intermediate_size=2 * hidden, num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=vocab,
                num_key_value_heads=2, tie_word_embeddings=tied)
    if module is qwen3:
        args.update(max_position_embeddings=512, head_dim=hidden // 4, rope_theta=10000.0)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(**args))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def batch(rows: int = 6, width: int = 40, vocab: int = VOCAB):
    """Random ids; row i's completion covers positions 5+i .. width-2i (the rest prompt or padding)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, width)).astype(np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i in range(rows):
        mask[i, 5 + i : width - 2 * i] = 1
    return mx.array(ids), mx.array(mask)


def close(ours, plain, rel=1e-5):
    """Equal to float32 rounding of a sum: |ours - plain| <= rel x max(1, |plain|), per sequence."""
    ours, plain = np.asarray(ours, np.float64), np.asarray(plain, np.float64)
    return np.all(np.abs(ours - plain) <= rel * np.maximum(1.0, np.abs(plain))), np.abs(ours - plain).max()


ARCHITECTURES = [(m, tied) for m in (llama, qwen2, qwen3) for tied in (False, True)]


@pytest.mark.parametrize("module,tied", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_values_counts_and_tails_equal_the_plain_computation(module, tied):
    model = tiny(module, tied)
    assert lm_head(model) is not None  # the chunked path, not the fallback
    ids, mask = batch()
    shared = mx.array([3, 9, 1, 20, 0, 7])
    budget = 7 * LIVE_CHUNK_ARRAYS * 4 * VOCAB  # 7 positions' worth: chunks of ROW_TILE, the least; many
    assert chunk_positions(VOCAB, budget) == ROW_TILE
    ours = sequence_logps(model, ids, mask, shared, budget=budget)
    plain = plain_sequence_logps(model, ids, mask, shared)
    for a, b in zip(ours, plain):
        ok, worst = close(a, b)
        assert ok, worst
    assert np.array(ours[1]).tolist() == np.array(plain[1]).tolist()


@pytest.mark.parametrize("module,tied", ARCHITECTURES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_gradients_equal_the_plain_computation(module, tied):
    """Every parameter trainable, the head and the (tied) embedding included: the checkpointed chunks
    pass the head's gradient as well as the body's."""
    model = tiny(module, tied)
    ids, mask = batch()

    def grads(fn):
        loss = lambda m: (fn(m, ids, mask)[0] * mx.arange(1, 7)).sum()  # noqa: E731  distinct weight per row
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    ours = grads(lambda m, i, k: sequence_logps(m, i, k, budget=5 * LIVE_CHUNK_ARRAYS * 4 * VOCAB))
    plain = grads(plain_sequence_logps)
    assert ours.keys() == plain.keys() and any("embed_tokens" in k for k in ours)
    for name in plain:
        scale = float(mx.abs(plain[name]).max())
        assert float(mx.abs(ours[name] - plain[name]).max()) <= 1e-5 * scale + 1e-9, name


def test_compiled_with_a_plan_from_the_host():
    """Inside mx.compile the positions cannot come from the traced mask: the plan is passed in."""
    model = tiny(llama, True)
    ids, mask = batch()
    plan = mx.array(score_plan(np.array(mask)))
    compiled = mx.compile(lambda i, k, p: sequence_logps(model, i, k, plan=p)[0])
    ok, worst = close(compiled(ids, mask, plan), plain_sequence_logps(model, ids, mask)[0])
    assert ok, worst


def test_compiled_gradients_equal_the_plain_computation():
    """The custom backward inside mx.compile (as the train step runs it), with weight-0 plan columns:
    every gradient of a trainable tied model equal to the plain path's, eager."""
    model = tiny(llama, True)
    ids, mask = batch()
    plan = mx.array(score_plan(np.array(mask), multiple=64))
    assert int(plan[2].sum()) < plan.shape[1]  # padded columns, weight 0
    loss = lambda m, fn: (fn(m)[0] * mx.arange(1, 7)).sum()  # noqa: E731
    budget = 9 * LIVE_CHUNK_ARRAYS * 4 * VOCAB
    ours = mx.compile(lambda i, k, p: nn.value_and_grad(model, lambda m: loss(m, lambda m: sequence_logps(
        m, i, k, plan=p, budget=budget)))(model)[1])(ids, mask, plan)
    plain = nn.value_and_grad(model, lambda m: loss(m, lambda m: plain_sequence_logps(m, ids, mask)))(model)[1]
    ours, plain = dict(tree_flatten(ours)), dict(tree_flatten(plain))
    assert ours.keys() == plain.keys()
    for name in plain:
        scale = float(mx.abs(plain[name]).max())
        assert float(mx.abs(ours[name] - plain[name]).max()) <= 1e-5 * scale + 1e-9, name


def test_score_plan_layout():
    plan = score_plan(np.array([[0, 0, 1, 1, 0], [1, 1, 0, 1, 1]]), multiple=8)
    # mask[:, 1:] = [[0, 1, 1, 0], [1, 0, 1, 1]]: flat positions 1, 2 and 4, 6, 7
    assert plan.tolist() == [
        [1, 2, 4, 6, 7, 0, 0, 0],  # index
        [0, 0, 1, 1, 1, 0, 0, 0],  # sequence
        [1, 1, 1, 1, 1, 0, 0, 0],  # weight
        [1, 2, 1, 2, 3, 0, 0, 0],  # rank
    ]


def extra_peak(fn, *inputs, warm: bool = False) -> int:
    """Peak bytes of evaluating fn() above what is active once `inputs` are evaluated and MLX's buffer
    cache is cleared; `warm`: call fn once before (a compiled function is traced outside the measurement)."""
    if warm:
        fn()
    mx.eval(*inputs)
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


@pytest.mark.parametrize("vocab", [16_000, 32_000, pytest.param(64_000, marks=pytest.mark.slow)])
def test_memory_above_the_body_stays_within_the_chunk_budget(vocab):
    """Peak memory of the log-prob pass minus that of the body alone, forward and with gradients: at
    most the chunk budget at 16k, 32k and 64k vocabulary (the full float32 logits here are 2 x 255 x V x 4
    bytes: 33-131 MB, which the plain computation holds)."""
    model = tiny(llama, True, vocab=vocab, hidden=32)
    ids = mx.random.randint(0, vocab, (2, 256), key=mx.random.key(0)).astype(mx.int32)
    mask = mx.ones_like(ids)
    budget = 32 * 2**20  # many chunks of a few positions at 64k

    body = extra_peak(lambda: model.model(ids[:, :-1]), ids, mask)
    ours = extra_peak(lambda: sequence_logps(model, ids, mask, budget=budget)[0], ids, mask)
    plain = extra_peak(lambda: plain_sequence_logps(model, ids, mask)[0], ids, mask)
    assert ours - body <= budget, (ours - body, budget)
    assert plain - body > 0.9 * 2 * 255 * vocab * 4  # the oracle holds the whole logits (the test can fail)

    # The backward pass recomputes each chunk's logits instead of keeping them from the forward.
    model.freeze()
    model.model.layers[0].unfreeze()
    grad = lambda fn: nn.value_and_grad(model, lambda m: fn(m).sum())(model)  # noqa: E731
    body = extra_peak(lambda: grad(lambda m: m.model(ids[:, :-1])), ids, mask)
    ours = extra_peak(lambda: grad(lambda m: sequence_logps(m, ids, mask, budget=budget)[0]), ids, mask)
    plain = extra_peak(lambda: grad(lambda m: plain_sequence_logps(m, ids, mask)[0]), ids, mask)
    assert ours - body <= budget, (ours - body, budget)
    assert plain - body > 0.9 * 2 * 255 * vocab * 4


def test_an_unknown_architecture_takes_the_plain_path():
    class Logits:  # not an mlx-lm module we checked: only model(ids) -> logits is used
        def __call__(self, ids):
            return mx.zeros((*ids.shape, 2))

    logps, counts = sequence_logps(Logits(), mx.array([[1, 1, 0]]), mx.array([[0, 1, 1]]))
    assert logps.item() == pytest.approx(2 * math.log(0.5)) and counts.tolist() == [2]


def test_head_gradients_equal_float64_at_a_larger_vocabulary():
    """_token_terms's own backward (the saved log-sum-exp, one softmax pass) against float64 numpy:
    d/dh and d/dW of sum_i c_i log softmax(W h_i)[t_i] = sum_i c_i (onehot(t_i) - softmax(W h_i)),
    with a trainable head, ragged chunks, zero cotangents (weight-0 positions) and peaked rows."""
    rng = np.random.default_rng(3)
    vocab, dim, positions = 5_000, 16, 23
    head = nn.Linear(dim, vocab, bias=False)
    weight = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    weight[7] *= 4  # token 7 dominates some rows: p close to 1 there
    head.weight = mx.array(weight)
    hidden = rng.normal(0, 1, (positions, dim)).astype(np.float32)
    targets = rng.integers(0, vocab, positions)
    targets[:5] = 7
    cot = rng.normal(0, 1, positions).astype(np.float32)
    cot[-4:] = 0

    def loss(h, w):
        head.weight = w
        return (_token_terms(head, h, mx.array(targets), 6) * mx.array(cot)).sum()

    gh, gw = mx.grad(loss, argnums=(0, 1))(mx.array(hidden), mx.array(weight))
    logits = hidden.astype(np.float64) @ weight.astype(np.float64).T
    soft = np.exp(logits - logits.max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    g = cot[:, None] * ((np.arange(vocab)[None] == targets[:, None]) - soft)
    for ours, exact in ((gh, g @ weight), (gw, g.T @ hidden)):
        assert np.abs(np.array(ours) - exact).max() <= 1e-5 * np.abs(exact).max()
