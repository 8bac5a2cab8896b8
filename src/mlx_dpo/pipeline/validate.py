"""Text data files checked line by line before `datasets` reads them: its errors name no line
(`JSON parse error ... in row 1` counts parse blocks), it reads bytes that are not UTF-8 without
complaint, and a JSON field whose type varies between rows becomes a `Json` column whose strings
are re-parsed (the text "4." comes back as the number 4.0, "[1]" as a list). One streaming pass;
the error names the file, line, column or field."""

import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

TEXT_SUFFIXES = (".jsonl", ".json", ".csv")


def check_data_files(data: str) -> None:
    """Raise a one-line UserError for the first unreadable text file of `data` (a file or folder)."""
    path = Path(data)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and not p.name.startswith("."))
    else:
        return
    for file in files:
        check = {".jsonl": check_jsonl, ".json": check_json}.get(file.suffix.lower())
        if check is not None:
            check(file)
        elif file.suffix.lower() == ".csv":
            for _ in text_lines(file):
                pass


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from error
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path}: line {number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                    "re-encode the file as UTF-8"
                ) from error


class FieldTypes:
    """The JSON type seen first at each field path ("chosen[].content"); a second type is an error."""

    def __init__(self, path: Path):
        self.path, self.seen = path, {}

    def check(self, value, where: str, field: str = "") -> None:
        kind = _json_type(value)
        if kind == "null":
            return  # datasets keeps nulls in a column of any type
        first = self.seen.setdefault(field, (kind, where))
        if first[0] != kind:
            raise UserError(
                f"{self.path}: {where}: field {field!r} is {kind}, but {first[1]} has {first[0]} there; "
                "use one type per field (null for none): datasets would silently re-parse such a column"
            )
        if isinstance(value, list):
            for item in value:
                self.check(item, where, field + "[]")
        elif isinstance(value, dict):
            for key, item in value.items():
                self.check(item, where, f"{field}.{key}" if field else key)


def check_jsonl(path: Path) -> None:
    rows, types = 0, FieldTypes(path)
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {number}: invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(value, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object, got {_json_type(value)}")
        types.check(value, f"line {number}")
        rows += 1
    if rows == 0:
        raise UserError(f"{path}: no rows (the file is empty)")


def check_json(path: Path) -> None:
    text = "".join(line for _, line in text_lines(path))
    if not text.strip():
        raise UserError(f"{path}: no rows (the file is empty)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON lines in a .json file: datasets reads those too
            return check_jsonl(path)
        raise UserError(f"{path}: line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from error
    if isinstance(value, list):
        types = FieldTypes(path)
        for number, row in enumerate(value):
            types.check(row, f"row {number}")


def _json_type(value) -> str:
    kinds = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")
