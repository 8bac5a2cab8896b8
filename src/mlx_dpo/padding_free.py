"""Padding-free forwards: the transformer body runs on each row alone, at that row's own width.

A padded batch runs every row to the width of its longest one; the padding is masked (causal: it
only follows the real tokens), so it changes no value, but the body computes it. Here each row runs
only up to the position that scores its last completion token, rounded up to a short ladder
(rows of one width share a forward), and the hidden states of all rows are concatenated. Each row is
computed as the padded batch computes it, minus the masked tail, so the log-probs are the same to
float rounding, with no attention mask beyond the causal one and no model code touched. On a CPU a
matmul of ~100+ rows already runs near the machine's peak, so splitting the batch costs little.

Unlike TRL's `padding_free` (one flattened row with position ids, FlashAttention only), nothing is
flattened: each row is its own forward.
"""

import mlx.core as mx
import numpy as np

from .shapes import ladder_ceil

# Row widths round up to multiples of 8 (the compiled step is traced once per tuple of row widths).
ROW_MULTIPLE = 8


def row_widths(completion_mask, multiple: int = ROW_MULTIPLE, ratio: float = 1.0) -> tuple[int, ...]:
    """Positions of the body each row of a (N, T) completion mask needs: up to the one that predicts its
    last completion token, rounded up to shapes.ladder_ceil(., multiple, ratio), at most T - 1 (the
    positions the padded path runs). A row without completion tokens gets the first rung.
    Example, mask [[0, 0, 1, 1, 0, 0]] (token 3 is predicted at position 2), multiple 1: (3,)."""
    mask = np.asarray(completion_mask)[:, 1:] != 0
    need = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1], axis=1), 0)
    return tuple(min(ladder_ceil(int(n), multiple, ratio), mask.shape[1]) for n in need)


def rows_body(model, input_ids: mx.array, widths: tuple[int, ...]) -> mx.array:
    """model.model's hidden states of each row's first widths[i] positions, rows one after the other:
    (sum(widths), D). input_ids: (N, L), the positions the padded path runs (input_ids[:, :-1] of a
    batch). Rows of the same width share one forward."""
    groups: dict[int, list[int]] = {}
    for row, width in enumerate(widths):
        groups.setdefault(width, []).append(row)
    parts = [None] * len(widths)
    for width, rows in groups.items():
        ids = input_ids[rows[0] : rows[0] + 1] if len(rows) == 1 else mx.take(input_ids, mx.array(rows), axis=0)
        hidden = model.model(ids[:, :width])  # (rows, width, D)
        for j, row in enumerate(rows):
            parts[row] = hidden[j]
    return mx.concatenate(parts) if len(parts) > 1 else parts[0]


def row_index(index: mx.array, widths: tuple[int, ...], length: int) -> mx.array:
    """Indices into the flattened (N, length) positions -> into rows_body's concatenation. Every scored
    position lies within its row's width; a weight-0 filler of the plan may not, and is clamped."""
    offsets = mx.array(np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int32))
    return mx.minimum(offsets[index // length] + index % length, sum(widths) - 1)
