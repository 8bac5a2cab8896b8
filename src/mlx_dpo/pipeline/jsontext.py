"""Object-valued JSON fields as written. Arrow gives each column one type and one key order: an
argument 3 becomes 3.0 where another row has 2.5, every object takes the first row's key order and
the keys of all rows (absent ones as null), and explicit nulls inside a list are dropped. So the
loader hands `datasets` a copy of each .jsonl/.json file whose object and array fields are JSON
text, and the dataset parses that text back with Python's json on access."""

import json
import os
from collections.abc import Iterator
from pathlib import Path


class MixedTypes(ValueError):
    """A field is a string in one data file and an object or array in another: the loader then names
    the two files (load._files_disagree), as for any two files that disagree."""


def json_text_copies(files: list[Path], root: Path, columns: set[str], folder: Path) -> list[Path]:
    """A copy of each JSON file (its path relative to `root`, under `folder`) with `columns` as JSON
    text; made once per content (`folder` is keyed by the data's sha256), streamed row by row."""
    copies = []
    for file in files:
        relative = Path(file.name) if file == root else file.relative_to(root)
        copy = folder / "rows" / relative.with_name(relative.name + ".jsonl")  # train.json and train.jsonl apart
        if not copy.exists():
            copy.parent.mkdir(parents=True, exist_ok=True)
            partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
            with open(partial, "w", encoding="utf-8") as out:
                for where, row in _rows(file):
                    out.write(json.dumps(_as_text(row, columns, file, where), ensure_ascii=False) + "\n")
            os.replace(partial, copy)
        copies.append(copy)
    return copies


def _rows(file: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) of a file validation accepted: JSON lines, or a .json array of rows."""
    with open(file, encoding="utf-8") as handle:
        if file.suffix.lower() == ".json":
            try:
                rows = json.load(handle)
            except json.JSONDecodeError:  # JSON lines in a .json file (validation checked which)
                rows = None
            if rows is not None:
                yield from ((f"row {n}", row) for n, row in enumerate(rows if isinstance(rows, list) else [rows]))
                return
            handle.seek(0)
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield f"line {number}", json.loads(line)


def _as_text(row: dict, columns: set[str], file: Path, where: str) -> dict:
    out = dict(row)
    for column in columns & row.keys():
        value = row[column]
        if isinstance(value, str):  # another file of the folder holds an object or array there
            raise MixedTypes(f"{file}: {where}: field {column!r} is a string, but other data files have an object "
                             "or array there")
        if value is not None:
            out[column] = json.dumps(value, ensure_ascii=False)
    return out


class WrittenJson(str):
    """The JSON text of an object or array a data file holds (a kept-text column): formats.py parses
    it as written; the identity hashes its parse, as it hashed the object before (identity.py)."""


def parse_json_text(dataset, columns: set[str], keep_text: set[str]):
    """`dataset` whose `columns` (JSON text) read as the Python values json.loads gives, but for those
    of `keep_text` (`tools`, `chat_template_kwargs`): formats.py reads JSON text as written, null values
    too, where it drops the nulls of an object (those Arrow fills in for another row's keys)."""
    present = columns & set(dataset.column_names)
    if not present:
        return dataset

    def value(name: str, text: str | None):
        if text is None:
            return None
        return WrittenJson(text) if name in keep_text else json.loads(text)

    def parse(batch: dict) -> dict:
        return {name: [value(name, v) for v in values] if name in present else values
                for name, values in batch.items()}

    return dataset.with_transform(parse)


class KeyOrders:
    """Objects whose key order the identity must hold. It hashes objects with sorted keys, while a
    template's `tojson` renders them in their own order; Arrow gave every object of a column one order
    (the keys in the order first seen), which caches before this loader were made with. Those rows
    keep their identity; an object written in another order is named by `deviations`."""

    def __init__(self):
        self.seen: dict[str, list] = {}  # field path -> its keys, in the order first seen

    def deviations(self, value, path: str = "") -> list:
        """[(path, keys)] of the objects in `value` whose keys are not in the first-seen order."""
        found = []
        if isinstance(value, dict):
            order = self.seen.setdefault(path, [])
            order += [key for key in value if key not in order]
            if list(value) != sorted(value, key=order.index):
                found.append((path, list(value)))
            for key, item in value.items():
                found += self.deviations(item, f"{path}.{key}")
        elif isinstance(value, list):
            for item in value:
                found += self.deviations(item, path + "[]")
        return found
