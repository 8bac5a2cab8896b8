"""② Rows -> token ids, following TRL's DPO tokenization so numbers compare across tools.

TRL's rule (DPOTrainer._prepare_dataset): append EOS to plain-text completions lacking it;
tokenize the prompt alone and prompt+completion; the completion starts where the two token
lists diverge (tokens can merge across the boundary, and chat templates may render the prompt
differently alone); conversational rows go through the chat template, the prompt with
add_generation_prompt=True.
"""

from dataclasses import dataclass


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


def encode_row(tokenizer, row: dict) -> Encoded:
    """Token ids for one {prompt, chosen, rejected} row (TRL's convention, see module docstring)."""
    for field in ("prompt", "chosen", "rejected"):
        _check_text(row, field)
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if chosen == rejected:
        raise RowRejected("chosen identical to rejected")
    if is_conversational(prompt):
        if not (is_conversational(chosen) and is_conversational(rejected)):
            raise RowRejected("prompt is a message list but chosen/rejected are not")
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        prompt_chosen = _chat_ids(tokenizer, prompt + chosen, add_generation_prompt=False)
        prompt_rejected = _chat_ids(tokenizer, prompt + rejected, add_generation_prompt=False)
    else:
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise RowRejected("prompt is a string but chosen/rejected are message lists")
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        prompt_chosen = list(tokenizer(prompt + chosen)["input_ids"])
        prompt_rejected = list(tokenizer(prompt + rejected)["input_ids"])

    start = min(common_prefix_length(prompt_ids, prompt_chosen), common_prefix_length(prompt_ids, prompt_rejected))
    encoded = Encoded(prompt_ids[:start], prompt_chosen[start:], prompt_rejected[start:])
    if not encoded.chosen_ids or not encoded.rejected_ids:
        raise RowRejected("completion is empty after tokenization")
    return encoded


def check_fits(encoded: Encoded, max_length: int | None, truncation_mode: str) -> None:
    """TRL drops rows whose prompt fills max_length under keep_start (no completion token left)."""
    if max_length is not None and truncation_mode == "keep_start" and len(encoded.prompt_ids) >= max_length:
        raise RowRejected(f"prompt fills max_length ({len(encoded.prompt_ids)} >= {max_length} tokens)")
    if not encoded.prompt_ids and min(len(encoded.chosen_ids), len(encoded.rejected_ids)) < 2:
        # Position 0 has no context, so a one-token completion with no prompt scores nothing.
        raise RowRejected("no completion token left to score")
