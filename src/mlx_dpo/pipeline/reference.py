"""③ The reference model's log-probs for encoded rows, in length-sorted batches."""

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from ..logps import collate_pairs, sequence_logps


def length_sorted_batches(lengths: list[int], tokens_per_batch: int) -> list[list[int]]:
    """Positions grouped so each batch's padded size (2 sequences per pair x longest) stays
    within `tokens_per_batch`. Sorting by length first keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        # The first row of a batch is its longest, so it fixes the padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and 2 * width * (len(current) + 1) > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_rows(
    model,
    rows: list[dict],
    *,
    max_length: int | None,
    truncation_mode: str,
    pad_id: int,
    tokens_per_batch: int,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (positions in `rows`, chosen logps, rejected logps, chosen counts, rejected counts)."""
    lengths = [
        len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows
    ]
    if max_length is not None:
        lengths = [min(n, max_length) for n in lengths]
    for batch in length_sorted_batches(lengths, tokens_per_batch):
        input_ids, completion_mask = collate_pairs(
            [rows[i] for i in batch], max_length, truncation_mode, pad_id
        )
        logps, counts = sequence_logps(model, mx.array(input_ids), mx.array(completion_mask))
        mx.eval(logps, counts)
        logps, counts = np.array(logps), np.array(counts).astype(np.int32)
        n = len(batch)  # (2B,) -> chosen half, rejected half
        yield batch, logps[:n], logps[n:], counts[:n], counts[n:]
