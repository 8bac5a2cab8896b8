"""② Rows -> token ids, following TRL's DPO tokenization so numbers compare across tools.

TRL's rule (DPOTrainer._prepare_dataset): append EOS to plain-text completions lacking it;
tokenize the prompt alone and prompt+completion; the completion starts where the two token
lists diverge (tokens can merge across the boundary, and chat templates may render the prompt
differently alone); conversational rows go through the chat template, the prompt with
add_generation_prompt=True, with the row's `tools` and `chat_template_kwargs`.
"""

from dataclasses import dataclass
from numbers import Integral

from ..errors import one_line
from ..schemas.sequence import rejected_id_lists


@dataclass
class Encoded:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Text of the prompt's end that is in no training sequence: the template renders the prompt
    # alone (with the generation prompt) differently than inside the conversation. None: nothing.
    dropped_prompt_tail: str | None = None


class RowRejected(Exception):
    """A row that cannot be trained on; the message is its reason (one line), recorded in the rejects file."""

    def __init__(self, reason: str) -> None:
        super().__init__(one_line(reason))


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
        if not value:
            raise RowRejected(f"{field} has no messages")
        for number, message in enumerate(value, 1):
            _check_message(message, f"{field} message {number}")
        if field != "prompt" and all(not m["content"].strip() and not m.get("tool_calls") for m in value):
            raise RowRejected(f"empty {field}")  # as for an empty plain-text answer
    elif not isinstance(value, str):
        raise RowRejected(f"{field} is {type(value).__name__}, not a string or message list")
    elif not value.strip() and field != "prompt":
        raise RowRejected(f"empty {field}")


def _check_message(message: dict, where: str) -> None:
    """A message a template can render: string content (a tool call's null content is "" by now, see
    formats._message); tool_calls, if any, a list of objects, passed on as written."""
    content, calls = message.get("content"), message.get("tool_calls")
    if content is None:
        raise RowRejected(f"{where} has neither string content nor tool calls ({message['role']})")
    if not isinstance(content, str):
        raise RowRejected(f"{where} has {type(content).__name__} content, not a string ({message['role']})")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
        raise RowRejected(f"{where} has tool_calls that are not a list of objects ({message['role']})")


def _chat_ids(tokenizer, messages: list[dict], options: dict, add_generation_prompt: bool = False) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise RowRejected("conversational row, but the tokenizer has no chat template")
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **options
        )
    except Exception as error:  # the template's own raise_exception, or any failure while rendering
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RowRejected(f"chat template error: {message}") from error
    ids = out["input_ids"]
    if not isinstance(ids, list | tuple) or not all(isinstance(i, Integral) for i in ids):  # e.g. tensors
        raise RowRejected(f"the chat template with options {', '.join(sorted(options))} gives no list of token ids")
    return [int(i) for i in ids]


def is_several(rejected) -> bool:
    """A list of K answers (strings or message lists), as opposed to one answer or one message list."""
    return (
        isinstance(rejected, list)
        and len(rejected) > 0
        and not is_conversational(rejected)
        and all(isinstance(r, str) or is_conversational(r) for r in rejected)
    )


def _completion_ids(tokenizer, prompt, completion, options: dict) -> list[int]:
    """Token ids of prompt + completion, the way TRL forms them."""
    if is_conversational(prompt):
        if not is_conversational(completion):
            raise RowRejected("prompt is a message list but a completion is not")
        return _chat_ids(tokenizer, prompt + completion, options)
    if not isinstance(completion, str):
        raise RowRejected("prompt is a string but a completion is a message list")
    eos = tokenizer.eos_token
    return list(tokenizer(prompt + (completion if completion.endswith(eos) else completion + eos))["input_ids"])


def template_options(row: dict, run_kwargs: dict | None) -> dict:
    """Keyword arguments for apply_chat_template: the run's chat-template options, then the row's
    tools and its own options (a row's value wins), as TRL builds {"tools": ..., **chat_template_kwargs}."""
    options = dict(run_kwargs or {})
    if row.get("tools") is not None or "tools" not in options:
        options["tools"] = row.get("tools")
    return {**options, **(row.get("chat_template_kwargs") or {})}


def _dropped_tail(tokenizer, prompt_ids: list[int], start: int, sequences: list[list[int]]) -> str | None:
    """The prompt text after `start` if some prompt+answer sequence does not continue with it (tokens
    merged across the boundary keep the text, a template that renders the prompt otherwise does not)."""
    if start == len(prompt_ids):
        return None
    tail = tokenizer.decode(prompt_ids[start:])
    if all(tokenizer.decode(ids[start:]).startswith(tail) for ids in sequences):
        return None
    return tail


def _split_apart_reason(pair_starts: list[int]) -> str:
    early = [str(k) for k, start in enumerate(pair_starts, 1) if start < max(pair_starts)]
    return (f"rejected answer(s) {', '.join(early)} (of {len(pair_starts)}) leave the prompt's tokens earlier than "
            "the others (tokens merging across the prompt's end, or a template rendering its end otherwise): with "
            "one shared prompt the (chosen, rejected) comparisons would not be the row's split pairs; give the row "
            "as separate pairs")


def encode_row(tokenizer, row: dict, chat_template_kwargs: dict | None = None) -> Encoded:
    """Token ids for one {prompt, chosen, rejected[, tools, chat_template_kwargs]} row (TRL's
    convention, see module docstring); `chat_template_kwargs` are the run's template options.
    With K rejected answers, rejected_ids is a list of K id lists sharing one prompt; a row whose
    (chosen, rejected_k) pairs would split the prompt at different tokens is rejected, so each
    comparison stays the pair it is when the row is split."""
    several = is_several(row["rejected"])
    for field in ("prompt", "chosen") + (() if several else ("rejected",)):
        _check_text(row, field)
    rejected_list = row["rejected"] if several else [row["rejected"]]
    for answer in rejected_list if several else ():
        _check_text({"rejected": answer}, "rejected")
    prompt, chosen = row["prompt"], row["chosen"]
    if chosen in rejected_list:
        raise RowRejected("chosen identical to rejected")
    options = template_options(row, chat_template_kwargs)
    if is_conversational(prompt):
        prompt_ids = _chat_ids(tokenizer, prompt, options, add_generation_prompt=True)
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    prompt_chosen = _completion_ids(tokenizer, prompt, chosen, options)
    prompt_rejected = [_completion_ids(tokenizer, prompt, answer, options) for answer in rejected_list]

    # The completion starts where the prompt alone and prompt+completion diverge (for both answers of a pair).
    chosen_start = common_prefix_length(prompt_ids, prompt_chosen)
    pair_starts = [min(chosen_start, common_prefix_length(prompt_ids, ids)) for ids in prompt_rejected]
    start = min(pair_starts)
    if len(set(pair_starts)) > 1:
        # One prompt_ids/chosen_ids per row: comparison k equals the k-th split pair only if all pairs start alike.
        raise RowRejected(_split_apart_reason(pair_starts))
    rejected_ids = [ids[start:] for ids in prompt_rejected]
    if not prompt_chosen[start:] or not all(rejected_ids):
        raise RowRejected("completion is empty after tokenization")
    if prompt_chosen[start:] in rejected_ids:  # e.g. " Bye." and " Bye.</s>" (EOS is appended once)
        raise RowRejected("chosen identical to rejected after tokenization")
    tail = _dropped_tail(tokenizer, prompt_ids, start, [prompt_chosen, *prompt_rejected])
    return Encoded(prompt_ids[:start], prompt_chosen[start:], rejected_ids if several else rejected_ids[0], tail)


def check_fits(encoded: Encoded, max_length: int | None, truncation_mode: str) -> None:
    """TRL drops rows whose prompt fills max_length under keep_start (no completion token left)."""
    if max_length is not None and truncation_mode == "keep_start" and len(encoded.prompt_ids) >= max_length:
        raise RowRejected(f"prompt fills max_length ({len(encoded.prompt_ids)} >= {max_length} tokens)")
    shortest = min(len(ids) for ids in [encoded.chosen_ids, *rejected_id_lists(encoded.rejected_ids)])
    if not encoded.prompt_ids and shortest < 2:
        # Position 0 has no context, so a one-token completion with no prompt scores nothing.
        raise RowRejected("no completion token left to score")
