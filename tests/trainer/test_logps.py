"""The shared log-prob function on hand-made logits: the one-token shift, prompt masking, padding."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.logps import collate_pairs, sequence_logps


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
