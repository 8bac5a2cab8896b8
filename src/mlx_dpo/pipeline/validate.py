"""Text data files checked line by line before `datasets` reads them: its errors name no line
(`JSON parse error ... in row 1` counts parse blocks), it reads bytes that are not UTF-8 without
complaint, and a JSON field whose type varies between rows becomes a `Json` column whose strings
are re-parsed (the text "4." comes back as the number 4.0, "[1]" as a list). One streaming pass;
the error names the file, line, column or field. The same pass hashes every file's bytes: `datasets`
knows its converted copy of a local file by path and mtime only, so the loader keys it by this digest."""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass
class DataCheck:
    """What the validation pass found: `digest`, the sha256 of the names and bytes of all files of a
    local `data` (None for a hub id), and `object_columns`, the top-level JSON fields holding an
    object or an array in some row of a .jsonl/.json file."""

    digest: str | None = None
    object_columns: set[str] = field(default_factory=set)


def check_data_files(data: str) -> DataCheck:
    """Raise a one-line UserError for the first unreadable text file of `data` (a file or folder)."""
    path = Path(data)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
    else:
        return DataCheck()
    digest, objects = hashlib.sha256(), set()
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        digest.update(json.dumps(name).encode() + b"\n")
        check = {".jsonl": check_jsonl, ".json": check_json}.get(file.suffix.lower())
        if check is not None:
            objects |= check(file, digest)
        else:  # CSV is checked for UTF-8 here; other files (Parquet, ...) are only hashed
            lines = text_lines(file, digest) if file.suffix.lower() == ".csv" else _chunks(file, digest)
            for _ in lines:
                pass
        digest.update(b"\0")
    return DataCheck(digest.hexdigest(), objects)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from error


def _chunks(path: Path, digest) -> Iterator[bytes]:
    with _open(path) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            yield chunk


def text_lines(path: Path, digest=None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, streamed; `digest` (a hashlib object) is fed its bytes."""
    with _open(path) as handle:
        for number, raw in enumerate(handle, 1):
            if digest is not None:
                digest.update(raw)
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


def _objects(row: dict) -> set[str]:
    return {key for key, value in row.items() if isinstance(value, (dict, list))}


def check_jsonl(path: Path, digest=None) -> set[str]:
    """Check a JSON-lines file; returns its object-valued top-level fields."""
    rows, types, objects = 0, FieldTypes(path), set()
    for number, line in text_lines(path, digest):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: line {number}: invalid JSON ({error.msg} at column {error.colno})") from error
        if not isinstance(value, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object, got {_json_type(value)}")
        types.check(value, f"line {number}")
        objects |= _objects(value)
        rows += 1
    if rows == 0:
        raise UserError(f"{path}: no rows (the file is empty)")
    return objects


def check_json(path: Path, digest=None) -> set[str]:
    """Check a .json file (an array of rows, or JSON lines); returns its object-valued top-level fields."""
    text = "".join(line for _, line in text_lines(path, digest))
    if not text.strip():
        raise UserError(f"{path}: no rows (the file is empty)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON lines in a .json file: datasets reads those too
            return check_jsonl(path)  # the bytes are hashed already
        raise UserError(f"{path}: line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from error
    objects = set()
    if isinstance(value, list):
        types = FieldTypes(path)
        for number, row in enumerate(value):
            types.check(row, f"row {number}")
            objects |= _objects(row) if isinstance(row, dict) else set()
    return objects


def _json_type(value) -> str:
    kinds = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")
