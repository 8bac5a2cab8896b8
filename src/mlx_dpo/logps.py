"""THE sequence log-prob function. The pipeline (reference) and the trainer (policy) both call it,
so the two stages score the same tokens the same way, bit for bit on the same batch."""

import mlx.core as mx
import numpy as np

from .schemas.sequence import rejected_id_lists, truncate_sequence

# Positions per logsumexp chunk: bounds the float32 temporary of the vocabulary softmax.
_CHUNK_POSITIONS = 1024


def collate_pairs(
    rows: list[dict],
    max_length: int | None,
    truncation_mode: str,
    pad_id: int,
    pad_to_multiple: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompt+chosen rows, then prompt+rejected rows, right-padded.

    Returns `input_ids` and `completion_mask`, both int32 of shape ((1+K)B, T): rows 0..B-1 are
    the chosen sequences, then B rows per rejected answer k (TRL's layout at K = 1). Example, one
    row with prompt [5, 6], chosen [7], rejected [8, 9], pad 0, pad_to_multiple 1:
        input_ids       [[5, 6, 7, 0], [5, 6, 8, 9]]
        completion_mask [[0, 0, 1, 0], [0, 0, 1, 1]]
    """
    several = [rejected_id_lists(row["rejected_ids"]) for row in rows]
    completions = [[row["chosen_ids"] for row in rows]]
    completions += [[answers[k] for answers in several] for k in range(len(several[0]))]
    sequences = [
        truncate_sequence(row["prompt_ids"], completion, max_length, truncation_mode)
        for block in completions
        for row, completion in zip(rows, block)
    ]
    width = max(len(ids) for ids, _ in sequences)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    completion_mask = np.zeros((len(sequences), width), dtype=np.int32)
    for i, (ids, mask) in enumerate(sequences):
        input_ids[i, : len(ids)] = ids
        completion_mask[i, : len(mask)] = mask
    return input_ids, completion_mask


def split_chosen_rejected(values, pairs: int, several: bool):
    """((1+K)B,) values in collate_pairs order -> chosen (B,), rejected (B,) or (B, K)."""
    chosen, rejected = values[:pairs], values[pairs:]
    if several:
        rejected = rejected.reshape(-1, pairs).T  # (K, B) -> (B, K)
    return chosen, rejected


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


def sequence_logps(
    model, input_ids: mx.array, completion_mask: mx.array, shared_lengths: mx.array | None = None
) -> tuple[mx.array, ...]:
    """Sum of log p(token | prefix) over completion tokens, per sequence.

    input_ids, completion_mask: (N, T). Token t is predicted from logits at t-1, so the mask is
    shifted by one and position 0 is never scored. Right padding needs no attention mask: under a
    causal mask, pads only come after the real tokens. Returns (logps (N,), token counts (N,)).
    With `shared_lengths` (N,), also the sum over completion tokens past the first
    shared_lengths ones (the "tail" of LD-DPO, Liu et al. 2024).
    """
    logits = model(input_ids[:, :-1])  # (N, T-1, V)
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].astype(mx.float32)
    per_token = token_logps(logits, targets) * mask  # (N, T-1)
    sums, counts = per_token.sum(axis=-1), mask.sum(axis=-1)
    if shared_lengths is None:
        return sums, counts
    position = mx.cumsum(mask, axis=-1)  # 1, 2, ... along each completion
    tail = (per_token * (position > shared_lengths[:, None])).sum(axis=-1)
    return sums, counts, tail


def shared_lengths(completion_mask, pairs: int):
    """LD-DPO's shared length of each (chosen, rejected) pair, for every row of a K = 1 batch:
    min(scored chosen tokens, scored rejected tokens), repeated for the chosen and rejected halves."""
    counts = completion_mask[:, 1:].sum(axis=-1)
    shared = mx.minimum(counts[:pairs], counts[pairs:]) if isinstance(counts, mx.array) else \
        np.minimum(counts[:pairs], counts[pairs:])
    return mx.concatenate([mx.array(shared)] * 2)
