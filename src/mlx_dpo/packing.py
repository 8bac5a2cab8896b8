"""Packed batches: several sequences per row, kept apart by a block-diagonal causal attention mask.

mlx-lm models ask their per-layer cache object for the attention mask (`make_mask`) and apply RoPE
at `cache.offset`. A stand-in "cache" that keeps no keys (offset 0) and makes a block-diagonal
causal mask lets a row hold several sequences without touching model code: a token attends only
to earlier tokens of its own sequence, and RoPE scores depend only on relative positions, so each
sequence is scored as if alone (to float rounding). Architectures where this was checked are
PACKABLE_MODULES; others take padded batches.
"""

import mlx.core as mx
import numpy as np

from .shapes import SCORE_MULTIPLE

# Checked by tests/trainer/test_packing.py: the mask comes from cache.make_mask, RoPE from cache.offset.
PACKABLE_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


def can_pack(model) -> bool:
    return type(model).__module__ in PACKABLE_MODULES


def pack_sequences(sequences: list[tuple[list[int], list[int]]], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """First-fit-decreasing packing of (ids, completion mask) sequences into rows of `width` tokens.

    Returns int32 arrays: input_ids, completion_mask and segments (R, width), where segments holds
    1 + the sequence's position in `sequences` (0 on padding), and plan (4, M) as logps.score_plan
    but with `sequence` naming the packed sequence. Raises ValueError if a sequence is longer than
    `width`.
    """
    rows, used = [], []
    for i in sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0])):
        length = len(sequences[i][0])
        if length > width:
            raise ValueError(f"sequence {i} has {length} tokens, more than the row width {width}")
        row = next((r for r, u in enumerate(used) if u + length <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += length
    input_ids = np.full((len(rows), width), pad_id, np.int32)
    mask, segments = np.zeros_like(input_ids), np.zeros_like(input_ids)
    for r, members in enumerate(rows):
        start = 0
        for i in sorted(members):  # a fixed order within the row
            ids, completion = sequences[i]
            input_ids[r, start : start + len(ids)] = ids
            mask[r, start : start + len(ids)] = completion
            segments[r, start : start + len(ids)] = i + 1
            start += len(ids)
    return dict(input_ids=input_ids, completion_mask=mask, segments=segments, plan=packed_plan(mask, segments))


def packed_plan(completion_mask: np.ndarray, segments: np.ndarray, multiple: int = SCORE_MULTIPLE) -> np.ndarray:
    """logps.score_plan for packed rows: position p scores token p+1 when that token is a completion
    token of the sequence that position p belongs to (a sequence's first token is never scored)."""
    target_segment = segments[:, 1:]
    scored = (completion_mask[:, 1:] != 0) & (segments[:, :-1] == target_segment) & (target_segment > 0)
    rows, cols = np.nonzero(scored)
    sequence = target_segment[rows, cols] - 1
    order = np.lexsort((cols, rows))  # row-major, as np.nonzero gives; ranks follow token order
    rank = np.zeros(len(rows), np.int64)
    seen: dict[int, int] = {}
    for j in order:
        seen[sequence[j]] = seen.get(sequence[j], 0) + 1
        rank[j] = seen[sequence[j]]
    count = len(rows)
    plan = np.zeros((4, max(-(-count // multiple) * multiple, multiple)), np.int32)
    plan[:, :count] = [rows * scored.shape[1] + cols, sequence, np.ones(count), rank]
    return plan


class SegmentMask:
    """Stands in for an mlx-lm layer cache during one full forward: keeps no keys (offset 0) and makes
    the block-diagonal causal mask of `segments` (R, L): (R, 1, L, L) booleans."""

    offset = 0

    def __init__(self, segments: mx.array):
        self.segments = segments

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        position = mx.arange(n)
        allowed = position[:, None] >= position[None]
        if window_size is not None:
            allowed = allowed & (position[:, None] < position[None] + window_size)
        same = self.segments[:, :, None] == self.segments[:, None, :]
        return (same & allowed)[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values
