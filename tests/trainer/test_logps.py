"""The shared log-prob function on hand-made logits: the one-token shift, prompt masking, padding."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dpo.logps import _token_terms, collate_pairs, sequence_logps, token_logps


class FixedLogits:
    """A 'model' that returns preset logits for the first T positions of its input."""

    def __init__(self, logits):
        self.logits = mx.array(logits, dtype=mx.float32)

    def __call__(self, ids):
        return self.logits[:, : ids.shape[1]]


def test_shift_mask_and_padding():
    # Vocab 3. Row 0: ids [0, 1, 2], completion = tokens 1 and 2 (prompt = token 0).
    # Row 1: ids [0, 2, pad], completion = token 2 only; the pad must not count.
    # Logits at position t predict token t+1.
    logits = np.zeros((2, 3, 3), dtype=np.float32)
    logits[0, 0] = [0, math.log(3), 0]  # p(1 | pos 0) = 3/5
    logits[0, 1] = [0, 0, math.log(2)]  # p(2 | pos 1) = 2/4
    logits[1, 0] = [0, 0, 0]  # p(2 | pos 0) = 1/3
    logits[1, 1] = [100, 0, 0]  # next position predicts the pad; masked out
    ids = mx.array([[0, 1, 2], [0, 2, 0]])
    mask = mx.array([[0, 1, 1], [0, 1, 0]])
    logps, counts = sequence_logps(FixedLogits(logits), ids, mask)
    assert logps.tolist() == pytest.approx([math.log(3 / 5) + math.log(2 / 4), math.log(1 / 3)], abs=1e-6)
    assert counts.tolist() == [2, 1]


def test_first_token_is_never_scored():
    """Position 0 has no context: a completion mask on it must not add a term."""
    logits = np.zeros((1, 2, 2), dtype=np.float32)
    logps, counts = sequence_logps(FixedLogits(logits), mx.array([[1, 1]]), mx.array([[1, 1]]))
    assert counts.tolist() == [1]
    assert logps.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_collate_pairs_layout():
    rows = [
        {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},
        {"prompt_ids": [1], "chosen_ids": [2, 3, 4], "rejected_ids": [4]},
    ]
    ids, mask = collate_pairs(rows, max_length=None, truncation_mode="keep_start", pad_id=0, pad_to_multiple=1)
    np.testing.assert_array_equal(ids, [
        [5, 6, 7, 0],  # row 0 chosen
        [1, 2, 3, 4],  # row 1 chosen
        [5, 6, 8, 9],  # row 0 rejected
        [1, 4, 0, 0],  # row 1 rejected
    ])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]])
    ids, _ = collate_pairs(rows, max_length=None, truncation_mode="keep_start", pad_id=0, pad_to_multiple=8)
    assert ids.shape == (4, 8)


@pytest.mark.parametrize("vocab", [49152, 50257])  # SmolLM2's (a multiple of the block) and GPT-2's (odd)
def test_token_logps_unbiased_over_a_large_vocabulary(vocab):
    """Log-probs over an LM-sized vocabulary (one likely token, a long tail) against float64 numpy.

    MLX's float32 sum on CPU adds the tail terms one by one into an accumulator near 1, so each term below
    half an ulp is lost: a one-shot logsumexp comes out low and every log-prob high (~+1e-4 per token on
    SmolLM2, always positive). Within 1e-5 the error is float32 rounding, not a bias.
    """
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.5, size=(2, 16, vocab)).astype(np.float32)
    logits[..., 7] += 25
    targets = rng.integers(0, vocab, size=(2, 16))
    targets[0] = 7
    wide = logits.astype(np.float64)
    top = wide.max(-1, keepdims=True)
    normaliser = top[..., 0] + np.log(np.exp(wide - top).sum(-1))
    exact = np.take_along_axis(wide, targets[..., None], -1)[..., 0] - normaliser
    ours = np.array(token_logps(mx.array(logits), mx.array(targets)), dtype=np.float64)
    assert np.abs(ours - exact).max() < 1e-5
    assert abs((ours - exact).mean()) < 2e-6  # no drift in one direction
    # The chunked head path (an identity head over the same logits, 5 positions per chunk) likewise.
    chunked = _token_terms(nn.Identity(), mx.array(logits.reshape(-1, vocab)), mx.array(targets.reshape(-1)), 5)
    chunked = np.array(chunked, dtype=np.float64).reshape(exact.shape)
    assert np.abs(chunked - exact).max() < 1e-5
    assert abs((chunked - exact).mean()) < 2e-6
