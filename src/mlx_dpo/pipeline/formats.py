"""Raw rows in any supported format -> {prompt, chosen, rejected}, before tokenization.

| format          | columns                                                                  |
|-----------------|--------------------------------------------------------------------------|
| standard        | prompt, chosen, rejected: strings                                        |
| conversational  | prompt: messages; chosen, rejected: assistant messages                   |
| implicit prompt | chosen, rejected only: the prompt is their longest common prefix (TRL)   |
| K rejected      | rejected: a list of strings, or a list of message lists                  |
Column names are configurable; an optional system column becomes a system message (or, for
plain-text prompts, a first paragraph).
"""

from dataclasses import dataclass

from .encode import RowRejected, is_conversational, is_several


@dataclass(frozen=True)
class Fields:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str = "system"

    def missing(self, columns: list[str]) -> list[str]:
        """Required columns absent from `columns` (the prompt may be implicit)."""
        return [name for name in (self.chosen, self.rejected) if name not in columns]


def common_prefix(chosen, rejected):
    """(prompt, chosen rest, rejected rest): TRL's extract_prompt, without its off-by-one when one
    side is a prefix of the other. For text, a space before the split point stays with the answers."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _add_system(prompt, system):
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise RowRejected(f"system is {type(system).__name__}, not a string")
    if is_conversational(prompt):
        return [{"role": "system", "content": system}, *prompt]
    return f"{system}\n\n{prompt}"


def normalize(raw: dict, fields: Fields) -> dict:
    """{prompt, chosen, rejected} with rejected a single answer, or a list of K answers."""
    chosen, rejected = raw[fields.chosen], raw[fields.rejected]
    if fields.prompt in raw and raw[fields.prompt] is not None:
        prompt = raw[fields.prompt]
    elif is_several(rejected):
        raise RowRejected("no prompt column: an implicit prompt needs exactly one rejected answer")
    else:
        for name, value in ((fields.chosen, chosen), (fields.rejected, rejected)):
            if not isinstance(value, str | list) or not value:
                raise RowRejected(f"empty {name}" if value in ("", [], None) else f"{name} is {type(value).__name__}, not a string or message list")
        if type(chosen) is not type(rejected):
            raise RowRejected("no prompt column, and chosen and rejected are of different types")
        prompt, chosen, rejected = common_prefix(chosen, rejected)
        if not prompt:
            raise RowRejected("no prompt column, and chosen and rejected share no prefix")
    return {"prompt": _add_system(prompt, raw.get(fields.system)), "chosen": chosen, "rejected": rejected}
