"""Row-level reuse: reference values of rows another cache already scored with the same reference.

A row's reference values depend only on its token ids and the reference (weights, dtype, tokenizer,
tokenization rules, max_length, truncation mode, schema): every identity field except which data and
splits the cache was built from. So a row whose (prompt_ids, chosen_ids, rejected_ids) some
verified cache of the same reference holds takes its values from there, whatever file or position
it came from; only the other rows run through the model. The values are copied into the new cache,
which therefore stands alone.
"""

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from ..schemas import describe_difference, read_manifest
from ..schemas.manifest import inside
from ..schemas.verify import check_cache

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Identity fields that say which rows a cache holds, not how a row is scored.
_DATA_FIELDS = ("data",)
_DATA_OPTIONS = ("splits", "valid_fraction")


def reference_fields(fields: dict) -> dict:
    """The identity fields that decide a row's values: all but the data and split choices."""
    kept = {k: v for k, v in fields.items() if k not in _DATA_FIELDS}
    if isinstance(kept.get("options"), dict):
        kept["options"] = {k: v for k, v in kept["options"].items() if k not in _DATA_OPTIONS}
    return kept


def row_key(row: dict, rejected_per_prompt: int) -> bytes:
    """sha256 of a row's token id lists (K rejected lists included) and K."""
    ids = [rejected_per_prompt] + [row[name] for name in ID_COLUMNS]
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).digest()


class ReuseIndex:
    """Row key -> (source label, {value column: value}) over the usable source caches."""

    def __init__(self):
        self.values: dict[bytes, tuple[str, dict]] = {}

    def add_cache(self, label: str, cache: Path, manifest) -> int:
        """Index every cached row of a verified cache; returns how many rows it added (first source wins)."""
        added, k = 0, manifest.rejected_per_prompt
        for split in manifest.splits.values():
            for shard in split.shards:
                table = pq.read_table(inside(cache, shard.path))
                columns = [name for name in table.column_names if name != "index"]
                for row in table.select(columns).to_pylist():
                    key = row_key(row, k)
                    if key not in self.values:
                        self.values[key] = (label, {n: v for n, v in row.items() if n not in ID_COLUMNS})
                        added += 1
        return added

    def fill(self, encoded: dict[str, list], rejected_per_prompt: int) -> dict[str, Counter]:
        """Give every encoded row (dicts; rejected rows are reason strings) found in the index its
        reference values, in place; returns per split how many rows came from each source."""
        counts = {}
        for split, rows in encoded.items():
            counts[split] = Counter()
            for row in rows:
                if isinstance(row, dict) and (hit := self.values.get(row_key(row, rejected_per_prompt))):
                    label, values = hit
                    row.update(values)
                    counts[split][label] += 1
        return counts


def is_scored(row: dict) -> bool:
    return "ref_chosen_logps" in row


def source_caches(out: Path, reuse_from: tuple[str, ...], scan_parent: bool, log: Callable) -> list[tuple[str, Path]]:
    """(label, local directory) of every candidate source: the complete caches under out's parent
    folder (as `cache ls` lists them), then each --reuse-from (a URL is mirrored locally first)."""
    from ..inspect_cache import find_caches  # reads files only
    from ..remote import is_remote, local_cache

    found = []
    if scan_parent:
        own = out.resolve()
        found += [(str(path), path) for path, problem in find_caches(out.parent)
                  if problem is None and path.resolve() != own]
    for location in reuse_from:
        path = Path(local_cache(location, log)) if is_remote(location) else Path(location)
        if not (path / "manifest.json").is_file():
            log(f"{location}: not reused: not a complete mlx-dpo cache (no manifest.json)")
            continue
        if all(path.resolve() != p.resolve() for _, p in found):
            found.append((location, path))
    return found


def build_index(sources: list[tuple[str, Path]], fields: dict, log: Callable) -> ReuseIndex:
    """Index the sources of the same reference as `fields`, each after the full check of `cache
    verify` (sha256, schema, identity, values, accounting); every source left out is said so."""
    index, wanted = ReuseIndex(), reference_fields(fields)
    for label, path in sources:
        try:
            manifest = read_manifest(path)
        except ValueError as error:  # an older schema, an unreadable manifest
            log(f"{label}: not reused: {error}")
            continue
        theirs = reference_fields(manifest.identity_fields)
        if theirs != wanted:
            log(f"{label}: not reused: another reference ({describe_difference(theirs, wanted)})")
            continue
        if problems := check_cache(path, manifest, full=True):
            log(f"{label}: not reused: fails verification ({problems[0]})")
            continue
        index.add_cache(label, path, manifest)
    return index
