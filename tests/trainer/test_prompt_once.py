"""The prompt once per pair (a prompt pass whose keys/values the answer rows attend to) scores every
sequence as the plain computation over prompt+answer rows does: values, token counts, LD-DPO tails
and gradients (LoRA and full), K = 1 and K = 2, prompts of mixed lengths."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.tuner.utils import linear_to_lora_layers
from test_logps_chunked import VOCAB, close, tiny

from mlx_dpo.logps import collate_pairs, plain_sequence_logps, score_plan, sequence_logps, shared_lengths
from mlx_dpo.prompt_once import can_share_prompt, collate_prompt_once


def rows(n: int = 5, k: int = 1, seed: int = 0) -> list[dict]:
    """Prompts of 1 to 12 tokens (the first of 1: its prompt pass holds only padding), answers of 1-11."""
    rng = np.random.default_rng(seed)
    ids = lambda m: rng.integers(4, VOCAB, m).tolist()  # noqa: E731
    out = []
    for i in range(n):
        answers = [ids(int(rng.integers(1, 12))) for _ in range(k)]
        out.append(dict(prompt_ids=ids(1 if i == 0 else int(rng.integers(2, 13))), chosen_ids=ids(int(rng.integers(1, 12))),
                        rejected_ids=answers if k > 1 else answers[0]))
    return out


def both(model, batch: list[dict], k: int, multiple: int = 1):
    """(ours, plain) as functions of the model: (logps, counts[, tails])."""
    ids, mask = collate_pairs(batch, None, "keep_start", pad_id=0, pad_to_multiple=multiple)
    once = collate_prompt_once(batch, None, "keep_start", pad_id=0, pad_to_multiple=multiple)
    shared = shared_lengths(mx.array(mask), len(batch)) if k == 1 else None
    if shared is not None:  # the answer rows give the same shared lengths
        assert shared_lengths(mx.array(once["completion_mask"]), len(batch)).tolist() == shared.tolist()
    prompt = (mx.array(once["prompt_ids"]), mx.array(once["prompt_mask"]))
    plan = mx.array(score_plan(once["completion_mask"]))

    def ours(m):
        return sequence_logps(m, mx.array(once["input_ids"]), mx.array(once["completion_mask"]), shared, plan, prompt=prompt)

    def plain(m):
        return plain_sequence_logps(m, mx.array(ids), mx.array(mask), shared)

    return ours, plain


def test_layout():
    batch = [dict(prompt_ids=[5, 6], chosen_ids=[7], rejected_ids=[8, 9]),
             dict(prompt_ids=[1, 2, 3, 4], chosen_ids=[10, 11], rejected_ids=[12])]
    once = collate_prompt_once(batch, None, "keep_start", pad_id=0, pad_to_multiple=1)
    assert once["prompt_ids"].tolist() == [[0, 0, 5], [1, 2, 3]]  # all but the last token, left-padded
    assert once["prompt_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert once["input_ids"].tolist() == [[6, 7, 0], [4, 10, 11], [6, 8, 9], [4, 12, 0]]
    assert once["completion_mask"].tolist() == [[0, 1, 0], [0, 1, 1], [0, 1, 1], [0, 1, 0]]


def test_unshared_or_empty_prompts_are_refused():
    batch = [dict(prompt_ids=[5, 6, 7], chosen_ids=[7], rejected_ids=[8, 9])]
    # keep_end at 4 tokens keeps chosen's prompt [5, 6, 7] whole but cuts rejected's to [6, 7]: not one prompt
    assert collate_prompt_once(batch, 4, "keep_end", pad_id=0) is None
    assert collate_prompt_once(batch, 4, "keep_start", pad_id=0) is not None
    assert collate_prompt_once([dict(batch[0], prompt_ids=[])], None, "keep_start", pad_id=0) is None


@pytest.mark.parametrize("module,tied", [(llama, False), (llama, True), (qwen2, True), (qwen3, False)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("k", [1, 2])
def test_values_counts_and_tails_equal_the_plain_computation(module, tied, k):
    model = tiny(module, tied)
    assert can_share_prompt(model)
    ours, plain = both(model, rows(k=k), k, multiple=8)  # padded widths: pads on both sides
    results = list(zip(ours(model), plain(model)))
    assert len(results) == (3 if k == 1 else 2)
    for a, b in results:
        ok, worst = close(a, b)
        assert ok, worst
    assert np.array(results[1][0]).tolist() == np.array(results[1][1]).tolist()  # token counts


def gradients(model, fn, rows_: int) -> dict:
    weights = mx.arange(1, rows_ + 1).astype(mx.float32)  # a distinct weight per sequence

    def loss(m):
        values = fn(m)
        return (values[0] * weights).sum() + (values[2] * weights).sum() if len(values) > 2 else (values[0] * weights).sum()

    return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))


@pytest.mark.parametrize("module,tied", [(llama, False), (qwen3, True)], ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_gradients_equal_the_plain_computation(module, tied, k, tuning):
    """The gradient reaches the prompt pass through the prompt keys/values: LoRA on every layer, or
    every parameter (embedding and head included)."""
    model = tiny(module, tied)
    if tuning == "lora":
        model.freeze()
        linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
        # lora_b starts at 0, which would make every lora_a gradient 0: give it values
        model.update(tree_map(lambda v: mx.random.normal(v.shape, key=mx.random.key(3)) * 0.05, model.trainable_parameters()))
    batch = rows(k=k)
    ours, plain = both(model, batch, k)
    a, b = gradients(model, ours, (1 + k) * len(batch)), gradients(model, plain, (1 + k) * len(batch))
    assert a.keys() == b.keys() and len(a) > 0
    if tuning == "lora":
        assert any("lora_a" in name for name in a) and not any("embed_tokens" in name for name in a)
    for name, g in b.items():
        scale = float(mx.abs(g).max())
        assert scale > 0, name
        assert float(mx.abs(a[name] - g).max()) <= 1e-5 * scale + 1e-9, name


def test_compiled():
    """Inside mx.compile, as the train step runs it."""
    model = tiny(llama, True)
    batch = rows(k=1)
    once = collate_prompt_once(batch, None, "keep_start", pad_id=0)
    arrays = [mx.array(once[name]) for name in ("input_ids", "completion_mask", "prompt_ids", "prompt_mask")]
    compiled = mx.compile(lambda i, k, p, q, plan: sequence_logps(model, i, k, plan=plan, prompt=(p, q))[0])
    _, plain = both(model, batch, 1)
    ok, worst = close(compiled(*arrays, mx.array(score_plan(once["completion_mask"]))), plain(model)[0])
    assert ok, worst
