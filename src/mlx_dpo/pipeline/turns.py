"""LLaMA-Factory's turn order for ShareGPT rows ({from, value} messages): its converter drops a row that breaks
it, and a chat template would render such a row otherwise than meant (a chosen answer spoken by `human`, an
answer after an assistant turn). After an optional first system turn, turns alternate a user side (human,
observation) and an assistant side (gpt, function_call), beginning with the user side; the prompt ends on the
user side; each answer begins and ends on the assistant side (LLaMA-Factory's answer is one gpt/function_call
message; an answer of several messages goes on alternating). TRL checks no order for {role, content} rows
(they reach the chat template as written): they are not checked.
"""

from .encode import RowRejected

Turns = list[tuple[str, dict]]  # (where the message is written, e.g. "conversations[2]", the message)

# Tuples, not sets: a role read from a {role, content} message of such a row may be unhashable.
_USER = ("human or observation", ("human", "observation", "user", "tool"))  # with TRL's names for the speakers
_ASSISTANT = ("gpt or function_call", ("gpt", "function_call", "assistant"))
_ORDER = "ShareGPT's turn order: an optional system turn, then human/observation and gpt/function_call in turn"


def is_sharegpt(message) -> bool:
    """Whether `message` is a ShareGPT {from, value} message: both keys set (Arrow gives each message the other
    form's keys, as null; a {role, content} message with a stray `from` stays {role, content})."""
    return isinstance(message, dict) and message.get("from") is not None and message.get("value") is not None


def speaker(message: dict):
    """The speaker as written: `from` of a ShareGPT message, else `role`."""
    return message["from"] if is_sharegpt(message) else message.get("role")


def _alternate(turns: Turns, first: tuple) -> None:
    sides = (first, _ASSISTANT if first is _USER else _USER)
    for i, (where, message) in enumerate(turns):
        expected, speakers = sides[i % 2]
        if speaker(message) not in speakers:
            raise RowRejected(f"{where} is {speaker(message)!r}, not a {expected} turn ({_ORDER})")


def check_prompt(name: str, turns: Turns) -> None:
    """Raises RowRejected unless the prompt `turns` (of column `name`) are in order and end on the user side."""
    if turns and speaker(turns[0][1]) == "system":
        turns = turns[1:]
    if not turns:
        raise RowRejected(f"{name} has no human turn for the answers to follow")
    _alternate(turns, _USER)
    where, last = turns[-1]
    if speaker(last) not in _USER[1]:
        raise RowRejected(f"{where} {speaker(last)!r} ends the prompt: ShareGPT answers follow a human or observation turn")


def check_answer(turns: Turns) -> None:
    """Raises RowRejected unless the answer `turns` begin and end on the assistant side and alternate."""
    _alternate(turns, _ASSISTANT)
    where, last = turns[-1]
    if speaker(last) not in _ASSISTANT[1]:  # LLaMA-Factory's conversations end on gpt/function_call too
        raise RowRejected(f"{where} {speaker(last)!r} ends the answer: a ShareGPT answer ends on a gpt or function_call turn")
