"""③ The reference model's log-probs for encoded rows, in length-sorted batches."""

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from ..logps import collate_pairs, sequence_logps, shared_lengths, split_chosen_rejected
from ..schemas.sequence import pair_length


def length_sorted_batches(lengths: list[int], tokens_per_batch: int, sequences_per_row: int = 2) -> list[list[int]]:
    """Positions grouped so each batch's padded size (1+K sequences per row x longest) stays
    within `tokens_per_batch`. Sorting by length first keeps padding small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches, current = [], []
    for i in order:
        # The first row of a batch is its longest, so it fixes the padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and sequences_per_row * width * (len(current) + 1) > tokens_per_batch:
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
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Yield (positions in `rows`, {cache column: values}): ref_chosen_logps (B,),
    ref_rejected_logps (B,) or (B, K), their token counts, and with K = 1 the LD-DPO tail sums."""
    lengths = [pair_length(r) for r in rows]
    several = bool(rows) and isinstance(rows[0]["rejected_ids"][0], list)
    sequences_per_row = 1 + (len(rows[0]["rejected_ids"]) if several else 1)
    if max_length is not None:
        lengths = [min(n, max_length) for n in lengths]
    for batch in length_sorted_batches(lengths, tokens_per_batch, sequences_per_row):
        input_ids, completion_mask = collate_pairs(
            [rows[i] for i in batch], max_length, truncation_mode, pad_id
        )
        mask = mx.array(completion_mask)
        shared = None if several else shared_lengths(mask, len(batch))
        outputs = sequence_logps(model, mx.array(input_ids), mask, shared)
        mx.eval(outputs)
        names = ["logps", "tokens", "tail_logps"]
        columns = {}
        for name, values in zip(names, outputs):
            values = np.array(values).astype(np.int32 if name == "tokens" else np.float32)
            chosen, rejected = split_chosen_rejected(values, len(batch), several)
            prefix = ("n_{}_tokens" if name == "tokens" else "ref_{}_" + name)
            columns[prefix.format("chosen")], columns[prefix.format("rejected")] = chosen, rejected
        yield batch, columns
