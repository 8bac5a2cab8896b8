"""② Rows -> token ids, following TRL's DPO tokenization so numbers compare across tools.

TRL's rule (DPOTrainer._prepare_dataset): append EOS to plain-text completions lacking it;
tokenize the prompt alone and prompt+completion; the completion starts where the two token
lists diverge (tokens can merge across the boundary, and chat templates may render the prompt
differently alone); conversational rows go through the chat template, the prompt with
add_generation_prompt=True.
"""

from dataclasses import dataclass

from ..schemas.sequence import rejected_id_lists


@dataclass
class Encoded:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


class RowRejected(Exception):
    """A row that cannot be trained on; the message is its reason, recorded in the rejects file."""


def is_conversational(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_text(row: dict, field: str) -> None:
    value = row[field]
    if is_conversational(value):
        if not value or any(not isinstance(m.get("content"), str) for m in value):
            raise RowRejected(f"{field} has a message without string content")
    elif not isinstance(value, str):
        raise RowRejected(f"{field} is {type(value).__name__}, not a string or message list")
    elif not value.strip() and field != "prompt":
        raise RowRejected(f"empty {field}")


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def is_several(rejected) -> bool:
    """A list of K answers (strings or message lists), as opposed to one answer or one message list."""
    return (
        isinstance(rejected, list)
        and len(rejected) > 0
        and not is_conversational(rejected)
        and all(isinstance(r, str) or is_conversational(r) for r in rejected)
    )


def _completion_ids(tokenizer, prompt, completion) -> list[int]:
    """Token ids of prompt + completion, the way TRL forms them."""
    if is_conversational(prompt):
        if not is_conversational(completion):
            raise RowRejected("prompt is a message list but a completion is not")
        return _chat_ids(tokenizer, prompt + completion, add_generation_prompt=False)
    if not isinstance(completion, str):
        raise RowRejected("prompt is a string but a completion is a message list")
    eos = tokenizer.eos_token
    return list(tokenizer(prompt + (completion if completion.endswith(eos) else completion + eos))["input_ids"])


def encode_row(tokenizer, row: dict) -> Encoded:
    """Token ids for one {prompt, chosen, rejected} row (TRL's convention, see module docstring).
    With K rejected answers, rejected_ids is a list of K id lists sharing one prompt."""
    several = is_several(row["rejected"])
    for field in ("prompt", "chosen") + (() if several else ("rejected",)):
        _check_text(row, field)
    rejected_list = row["rejected"] if several else [row["rejected"]]
    for answer in rejected_list if several else ():
        _check_text({"rejected": answer}, "rejected")
    prompt, chosen = row["prompt"], row["chosen"]
    if chosen in rejected_list:
        raise RowRejected("chosen identical to rejected")
    if is_conversational(prompt):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    prompt_chosen = _completion_ids(tokenizer, prompt, chosen)
    prompt_rejected = [_completion_ids(tokenizer, prompt, answer) for answer in rejected_list]

    # The completion starts where the prompt alone and prompt+completion diverge (for all answers).
    start = min(common_prefix_length(prompt_ids, ids) for ids in [prompt_chosen, *prompt_rejected])
    rejected_ids = [ids[start:] for ids in prompt_rejected]
    encoded = Encoded(prompt_ids[:start], prompt_chosen[start:], rejected_ids if several else rejected_ids[0])
    if not encoded.chosen_ids or not all(rejected_ids):
        raise RowRejected("completion is empty after tokenization")
    return encoded


def check_fits(encoded: Encoded, max_length: int | None, truncation_mode: str) -> None:
    """TRL drops rows whose prompt fills max_length under keep_start (no completion token left)."""
    if max_length is not None and truncation_mode == "keep_start" and len(encoded.prompt_ids) >= max_length:
        raise RowRejected(f"prompt fills max_length ({len(encoded.prompt_ids)} >= {max_length} tokens)")
    shortest = min(len(ids) for ids in [encoded.chosen_ids, *rejected_id_lists(encoded.rejected_ids)])
    if not encoded.prompt_ids and shortest < 2:
        # Position 0 has no context, so a one-token completion with no prompt scores nothing.
        raise RowRejected("no completion token left to score")
