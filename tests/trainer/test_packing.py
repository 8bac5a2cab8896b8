"""Packed rows (block-diagonal causal mask through mlx-lm's cache.make_mask) score each sequence as
if alone: equal to the padded batch and to the plain computation, values and gradients."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2, qwen3
from test_logps_chunked import VOCAB, close, tiny

from mlx_dpo.logps import collate_pairs, plain_sequence_logps, sequence_logps, shared_lengths
from mlx_dpo.packing import can_pack, pack_sequences
from mlx_dpo.schemas.sequence import truncate_sequence


def pairs(n: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(4, VOCAB, k).tolist()  # noqa: E731
    return [dict(prompt_ids=ids(int(rng.integers(2, 9))), chosen_ids=ids(int(rng.integers(1, 12))),
                 rejected_ids=ids(int(rng.integers(1, 12)))) for _ in range(n)]


def packed(rows: list[dict], width: int):
    seqs = [truncate_sequence(r["prompt_ids"], r[k], None) for k in ("chosen_ids", "rejected_ids") for r in rows]
    return pack_sequences(seqs, width, pad_id=0)


def test_pack_layout():
    out = pack_sequences([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])], width=6, pad_id=0)
    # longest first: sequence 2 opens row 0, sequence 0 does not fit beside it, sequence 1 does
    assert out["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9], [1, 2, 3, 0, 0, 0]]
    assert out["segments"].tolist() == [[2, 2, 3, 3, 3, 3], [1, 1, 1, 0, 0, 0]]
    # scored (flat over 2 x 5 positions): row 0 position 0 (seq 1's token 5), 3 and 4 (seq 2's 8, 9);
    # row 1 positions 0 and 1 (seq 0's 2, 3). Position 1 would predict seq 2's first token: never scored.
    assert out["plan"][:, :5].tolist() == [[0, 3, 4, 5, 6], [1, 2, 2, 0, 0], [1] * 5, [1, 1, 2, 1, 2]]
    with pytest.raises(ValueError, match="more than the row width"):
        pack_sequences([([1] * 7, [1] * 7)], width=6, pad_id=0)


@pytest.mark.parametrize("module,tied", [(llama, False), (llama, True), (qwen2, True), (qwen3, False)],
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_packed_equals_padded_values_and_gradients(module, tied):
    model = tiny(module, tied)
    assert can_pack(model)
    rows = pairs()
    ids, mask = collate_pairs(rows, None, "keep_start", pad_id=0, pad_to_multiple=1)
    p = packed(rows, width=32)
    assert len(p["input_ids"]) < len(ids)  # several sequences share a row
    shared = shared_lengths(mask, len(rows))

    def padded_fn(m):
        return plain_sequence_logps(m, mx.array(ids), mx.array(mask), shared)

    def packed_fn(m):
        return sequence_logps(m, mx.array(p["input_ids"]), mx.array(p["completion_mask"]), shared,
                              mx.array(p["plan"]), segments=mx.array(p["segments"]), sequences=len(ids))

    for a, b in zip(packed_fn(model), padded_fn(model)):
        ok, worst = close(a, b)
        assert ok, worst
    model.freeze()
    model.model.layers[0].unfreeze()
    weights = mx.arange(1, len(ids) + 1)
    grad = lambda fn: dict(tree_flatten(nn.value_and_grad(model, lambda m: (fn(m)[0] * weights).sum())(model)[1]))  # noqa: E731
    ours, plain = grad(packed_fn), grad(padded_fn)
    for name, g in plain.items():
        assert float(mx.abs(ours[name] - g).max()) <= 1e-5 * float(mx.abs(g).max()) + 1e-9, name


def test_unknown_architectures_are_not_packed():
    class Other:
        pass

    assert not can_pack(Other())
