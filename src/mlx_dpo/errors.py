"""Errors the CLI shows as one line (no traceback unless --debug)."""

import click


class UserError(click.ClickException):
    """Bad input or environment: the message names the file, row and field at fault."""

    def format_message(self) -> str:
        return self.message
