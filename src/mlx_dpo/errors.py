"""Errors the CLI shows as one line (no traceback unless --debug)."""

import click

# Longest one-line message; a library's message past it is cut (--debug shows it whole).
MAX_MESSAGE = 400


def one_line(text: str) -> str:
    """`text` as one line: its non-blank lines joined with " / " and cut at MAX_MESSAGE characters.
    Libraries' messages often span lines (a cast error's schema, one line per tensor) and are passed
    on inside ours, which must stay one line naming file, row and field."""
    joined = ""
    for line in (line.strip() for line in str(text).splitlines() if line.strip()):
        # a line that only closes what the previous one opened (e.g. "(" + message + ")") joins it directly
        joined += line if not joined or line[0] in ")]},.;:" else " / " + line
    return joined if len(joined) <= MAX_MESSAGE else joined[:MAX_MESSAGE - 1].rstrip() + "…"


class UserError(click.ClickException):
    """Bad input or environment: the message names the file, row and field at fault (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

    def format_message(self) -> str:
        return self.message
