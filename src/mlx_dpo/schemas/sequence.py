"""How a cached row becomes the token sequence a model scores: TRL's truncation rule.

Both stages call this, so the trainer scores exactly the tokens the reference scored.
"""

TRUNCATION_MODES = ("keep_start", "keep_end")


def truncate_sequence(
    prompt_ids: list[int], completion_ids: list[int], max_length: int | None, mode: str = "keep_start"
) -> tuple[list[int], list[int]]:
    """Concatenate prompt and completion and truncate to `max_length` like TRL's collator.

    Returns `(ids, completion_mask)`. Example, prompt [1, 2, 3], completion [4, 5], max_length 4:
    keep_start -> [1, 2, 3, 4], mask [0, 0, 0, 1]; keep_end -> [2, 3, 4, 5], mask [0, 0, 1, 1].
    """
    ids = list(prompt_ids) + list(completion_ids)
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is not None and len(ids) > max_length:
        if mode == "keep_start":
            ids, mask = ids[:max_length], mask[:max_length]
        elif mode == "keep_end":
            ids, mask = ids[-max_length:], mask[-max_length:]
        else:
            raise ValueError(f"truncation mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    return ids, mask


def rejected_id_lists(rejected_ids: list) -> list[list[int]]:
    """A row's rejected answers as a list of id lists: [ids] for one answer, the K lists as they are."""
    return rejected_ids if rejected_ids and isinstance(rejected_ids[0], list) else [rejected_ids]


def pair_length(row: dict) -> int:
    """Tokens in the row's longest prompt+answer sequence, before truncation (the length batches sort by)."""
    return len(row["prompt_ids"]) + max(map(len, [row["chosen_ids"], *rejected_id_lists(row["rejected_ids"])]))


def scored_token_count(completion_mask: list[int]) -> int:
    """Completion tokens that get a log-prob: position 0 has no context, so it is never scored."""
    return sum(completion_mask[1:])
