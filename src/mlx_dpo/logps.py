"""THE sequence log-prob function. The pipeline (reference) and the trainer (policy) both call it,
so the two stages score the same tokens the same way, bit for bit on the same batch."""

import mlx.core as mx
import numpy as np

from .schemas.sequence import truncate_sequence

# Positions per logsumexp chunk: bounds the float32 temporary of the vocabulary softmax.
_CHUNK_POSITIONS = 1024


def collate_pairs(
    rows: list[dict],
    max_length: int | None,
    truncation_mode: str,
    pad_id: int,
    pad_to_multiple: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompt+chosen rows then prompt+rejected rows, right-padded.

    Returns `input_ids` and `completion_mask`, both int32 of shape (2B, T): rows 0..B-1 are the
    chosen sequences, rows B..2B-1 the rejected ones (TRL's layout). Example, one row with prompt
    [5, 6], chosen [7], rejected [8, 9], pad 0, pad_to_multiple 1:
        input_ids       [[5, 6, 7, 0], [5, 6, 8, 9]]
        completion_mask [[0, 0, 1, 0], [0, 0, 1, 1]]
    """
    sequences = [
        truncate_sequence(row["prompt_ids"], row[key], max_length, truncation_mode)
        for key in ("chosen_ids", "rejected_ids")
        for row in rows
    ]
    width = max(len(ids) for ids, _ in sequences)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    completion_mask = np.zeros((len(sequences), width), dtype=np.int32)
    for i, (ids, mask) in enumerate(sequences):
        input_ids[i, : len(ids)] = ids
        completion_mask[i, : len(mask)] = mask
    return input_ids, completion_mask


def token_logps(logits: mx.array, targets: mx.array) -> mx.array:
    """log softmax(logits)[targets] in float32, without materialising the full log-softmax.

    logits: (N, T, V); targets: (N, T) -> (N, T).
    """
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(mx.float32)
    n, t, _ = logits.shape
    if t <= _CHUNK_POSITIONS:
        normaliser = mx.logsumexp(logits.astype(mx.float32), axis=-1)
    else:
        normaliser = mx.concatenate(
            [
                mx.logsumexp(logits[:, s : s + _CHUNK_POSITIONS].astype(mx.float32), axis=-1)
                for s in range(0, t, _CHUNK_POSITIONS)
            ],
            axis=1,
        )
    return picked - normaliser


def sequence_logps(model, input_ids: mx.array, completion_mask: mx.array) -> tuple[mx.array, mx.array]:
    """Sum of log p(token | prefix) over completion tokens, per sequence.

    input_ids, completion_mask: (N, T). Token t is predicted from logits at t-1, so the mask is
    shifted by one and position 0 is never scored. Right padding needs no attention mask: under a
    causal mask, pads only come after the real tokens. Returns (logps (N,), token counts (N,)).
    """
    logits = model(input_ids[:, :-1])  # (N, T-1, V)
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].astype(mx.float32)
    per_token = token_logps(logits, targets)  # (N, T-1)
    return (per_token * mask).sum(axis=-1), mask.sum(axis=-1)
