"""Raw rows in any supported format -> {prompt, chosen, rejected, tools, chat_template_kwargs}.

| format          | columns                                                                        |
|-----------------|--------------------------------------------------------------------------------|
| standard        | prompt, chosen, rejected: strings                                              |
| conversational  | prompt: messages; chosen, rejected: assistant messages, or one message object  |
| sharegpt        | conversations: {from, value} messages; chosen, rejected: one {from, value}     |
| implicit prompt | chosen, rejected only: the prompt is split off as TRL's extract_prompt does    |
| K rejected      | rejected: a list of strings, or a list of message lists                        |
Messages may carry OpenAI-style tool calls (assistant `tool_calls`, `tool` messages; ShareGPT
`function_call`/`observation`): they go to the chat template as written, but for "" as a tool call's text.
A row with any {from, value} message must keep LLaMA-Factory's turn order (turns.py); {role, content} rows,
as in TRL, need none.
Column names are configurable; an optional system column becomes a system message (or, for
plain-text prompts, a first paragraph), unless the prompt begins with a system message: that one wins, as a
first system turn does in LLaMA-Factory. Optional `tools` (a list, or its JSON text) and
`chat_template_kwargs` (an object) columns go to the chat template as TRL passes them.
"""

import json
from dataclasses import dataclass

from .config import RESERVED_TEMPLATE_ARGUMENTS
from .encode import RowRejected, is_conversational, is_several
from .turns import Turns, check_answer, check_prompt, is_sharegpt

# ShareGPT / LLaMA-Factory speaker names (its default tags) -> chat-template roles; a function_call becomes
# an assistant message with tool_calls, an observation (the tool's result) a tool message.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "observation": "tool", "tool": "tool", "function_call": "assistant"}


@dataclass(frozen=True)
class Fields:
    """Column names by role; prompt None = implicit prompt, system None = no system column. Every
    role's column is part of the cache identity (pipeline/identity.py hashes them)."""

    prompt: str | None = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str | None = "system"
    tools: str = "tools"  # TRL's names
    chat_template_kwargs: str = "chat_template_kwargs"


def drop_nulls(value):
    """`value` without null entries in its objects: Arrow gives every object of a column the keys of
    all of them, absent ones as null, and a template must see the keys the row has."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _is_message(value) -> bool:
    return isinstance(value, dict) and (value.get("role") is not None or is_sharegpt(value))


def _message(value: dict) -> dict:
    if not is_sharegpt(value):  # {role, content}; Arrow may add from/value, and other messages' keys, as null
        message = {k: drop_nulls(v) for k, v in value.items() if v is not None}
        if message.get("tool_calls") and message.get("content") is None:
            # OpenAI writes a tool call's missing text as null; templates such as Qwen3's need a string (and
            # transformers drops null keys, so the row would fail in TRL too): "" renders as no text.
            message["content"] = ""
        return message
    speaker = value["from"]
    if not isinstance(speaker, str):  # e.g. {"name": "human"}: no role to look up (nor a hashable key)
        raise RowRejected(f"ShareGPT speaker {speaker!r} is {type(speaker).__name__}, not a string")
    if speaker not in SHAREGPT_ROLES:
        raise RowRejected(f"unknown ShareGPT speaker {speaker!r} (known: {', '.join(SHAREGPT_ROLES)})")
    if speaker == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _function_calls(value["value"])}
    # from/value give role and content (as TRL's maybe_convert_to_chatml and LLaMA-Factory read them)
    extra = {k: v for k, v in value.items() if k not in ("from", "value", "role", "content") and v is not None}
    return {"role": SHAREGPT_ROLES[speaker], "content": value["value"], **extra}


def _function_calls(value) -> list[dict]:
    """OpenAI-style tool_calls for LLaMA-Factory's function_call value: the JSON of one {name, arguments}
    call, or of a list of them (parallel calls)."""
    calls = _json(value, "function_call value")
    calls = calls if isinstance(calls, list) else [calls]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        raise RowRejected("function_call value is not a {name, arguments} object or a list of them")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def as_messages(value):
    """(messages, sharegpt): a message list in {role, content} form for one message object or a list
    of them (either form); (value, False) unchanged for anything else."""
    if _is_message(value):
        return [_message(value)], is_sharegpt(value)
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return [_message(m) for m in value], any(is_sharegpt(m) for m in value)
    return value, False


def _written(name: str, value) -> Turns | None:
    """A message object or list as written, each message labelled by its place (`chosen`, `chosen[1]`), []
    for an empty list (no turns: an empty prompt is no human turn); None for anything else."""
    if _is_message(value):
        return [(name, value)]
    if isinstance(value, list) and all(_is_message(m) for m in value):
        return [(f"{name}[{i}]", m) for i, m in enumerate(value)]
    return None


def check_sharegpt_turns(raw: dict, fields: Fields, prompt_length: int) -> None:
    """LLaMA-Factory's turn order (turns.py) on a ShareGPT row's messages as written; `prompt_length`: the
    messages of an implicit prompt (split off chosen and rejected). Raises RowRejected naming the turn."""
    chosen, rejected = _written(fields.chosen, raw[fields.chosen]), _written(fields.rejected, raw[fields.rejected])
    if fields.prompt is None:
        name, prompt = fields.chosen, chosen and chosen[:prompt_length]
        answers = [chosen and chosen[prompt_length:], rejected and rejected[prompt_length:]]
    else:
        name, prompt, answers = fields.prompt, _written(fields.prompt, raw[fields.prompt]), [chosen, rejected]
        if rejected is None and isinstance(raw[fields.rejected], list):  # K answers
            answers[1:] = [_written(f"{fields.rejected}[{k}]", a) for k, a in enumerate(raw[fields.rejected])]
    if prompt is not None:  # plain text mixed with messages: encode rejects the row
        check_prompt(name, prompt)
    for answer in answers:
        if answer:
            check_answer(answer)


def _json(value, name: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise RowRejected(f"{name} is not valid JSON ({error.msg} at column {error.colno})") from error


def _column_value(raw: dict, name: str):
    """A column's value: JSON text parsed as written (its nulls are the user's), Arrow values without
    the nulls Arrow fills in (see drop_nulls)."""
    value = raw.get(name)
    return _json(value, name) if isinstance(value, str) else drop_nulls(value)


def row_template_options(raw: dict, fields: Fields) -> tuple[list | None, dict]:
    """The row's tools (None when absent) and chat-template keyword arguments ({} when absent)."""
    tools = _column_value(raw, fields.tools)
    if tools is not None and not isinstance(tools, list):
        raise RowRejected(f"{fields.tools} is {type(tools).__name__}, not a list of tool definitions")
    kwargs = _column_value(raw, fields.chat_template_kwargs)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise RowRejected(f"{fields.chat_template_kwargs} is {type(kwargs).__name__}, not an object")
    if taken := sorted(RESERVED_TEMPLATE_ARGUMENTS & kwargs.keys()):
        raise RowRejected(f"{fields.chat_template_kwargs}: {', '.join(taken)} is set by mlx-dpo itself")
    return tools, kwargs


def extract_prompt(chosen, rejected):
    """(prompt, chosen rest, rejected rest), split as TRL 1.16's extract_prompt splits: at the first
    difference, a space before it going with the answers; when one side is a prefix of the other,
    one item before its end (TRL's loop index stops there)."""
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise RowRejected(f"empty {'chosen' if not chosen else 'rejected'}")
    split = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if split is None:
        split = n - 1
    elif split > 0 and chosen[split - 1] == " ":
        split -= 1
    elif split == 0 and chosen[-1] == " ":
        # TRL's chosen[idx - 1] wraps around to the last character and keeps all but one as "prompt".
        raise RowRejected("no prompt column, and chosen and rejected share no prefix")
    return chosen[:split], chosen[split:], rejected[split:]


def _implicit(chosen, rejected, fields: Fields):
    if is_several(rejected):
        raise RowRejected("no prompt column: an implicit prompt needs exactly one rejected answer")
    for name, value in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not isinstance(value, str | list) or (isinstance(value, list) and not is_conversational(value)):
            raise RowRejected(f"{name} is {type(value).__name__}, not a string or message list")
    if type(chosen) is not type(rejected):
        raise RowRejected("no prompt column, and chosen and rejected are of different types")
    if chosen == rejected:
        raise RowRejected("chosen identical to rejected")
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if isinstance(prompt, list) and not prompt:
        raise RowRejected("no prompt column, and chosen and rejected share no first message")
    return prompt, chosen, rejected


def _add_system(prompt, system):
    """The prompt with the system column's text first; a prompt's own first system message wins (LLaMA-Factory
    reads the column only without a first system turn): two would render as two system messages."""
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise RowRejected(f"system is {type(system).__name__}, not a string")
    if is_conversational(prompt):
        has_own = bool(prompt) and prompt[0]["role"] == "system"
        return prompt if has_own else [{"role": "system", "content": system}, *prompt]
    return f"{system}\n\n{prompt}"


def normalize(raw: dict, fields: Fields) -> tuple[dict, str]:
    """({prompt, chosen, rejected, tools, chat_template_kwargs}, format name) for one raw row;
    rejected is a single answer or a list of K answers. Raises RowRejected with the reason."""
    chosen, sharegpt_chosen = as_messages(raw[fields.chosen])
    rejected, sharegpt_rejected = as_messages(raw[fields.rejected])
    if isinstance(rejected, list) and not is_conversational(rejected):  # K answers: each in either message form
        answers = [as_messages(answer) for answer in rejected]
        rejected, sharegpt_rejected = [a for a, _ in answers], any(sharegpt for _, sharegpt in answers)
    if fields.prompt is None:
        prompt, chosen, rejected = _implicit(chosen, rejected, fields)
        kind, sharegpt = "implicit prompt", sharegpt_chosen or sharegpt_rejected
    else:
        if raw.get(fields.prompt) is None:
            raise RowRejected("missing prompt")
        prompt, sharegpt = as_messages(raw[fields.prompt])
        sharegpt = sharegpt or sharegpt_chosen or sharegpt_rejected
        kind = "conversational" if is_conversational(prompt) else "standard"
    if sharegpt:
        check_sharegpt_turns(raw, fields, len(prompt) if isinstance(prompt, list) else 0)
    kind = "sharegpt" if sharegpt else kind
    tools, kwargs = row_template_options(raw, fields)
    row = {"prompt": _add_system(prompt, raw.get(fields.system) if fields.system else None),
           "chosen": chosen, "rejected": rejected, "tools": tools, "chat_template_kwargs": kwargs}
    return row, kind
