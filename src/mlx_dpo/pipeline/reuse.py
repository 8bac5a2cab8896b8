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

from ..errors import UserError
from ..schemas import describe_difference, read_manifest
from ..schemas.identity import reference_fields
from ..schemas.manifest import inside
from ..schemas.verify import check_cache

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
def row_key(row: dict, rejected_per_prompt: int) -> bytes:
    """sha256 of a row's token id lists (K rejected lists included) and K."""
    ids = [rejected_per_prompt] + [row[name] for name in ID_COLUMNS]
    return hashlib.sha256(json.dumps(ids, separators=(",", ":")).encode()).digest()


def _wanted(encoded: dict[str, list], rejected_per_prompt: int) -> dict[bytes, list[tuple[str, dict]]]:
    """Row key -> the (split, row) that have it (a row may repeat), for every encoded row not yet scored."""
    wanted = {}
    for split, rows in encoded.items():
        for row in rows:
            if isinstance(row, dict) and not is_scored(row):  # rejected rows are reason strings
                wanted.setdefault(row_key(row, rejected_per_prompt), []).append((split, row))
    return wanted


def _take(label: str, cache: Path, manifest, wanted: dict, counts: dict[str, Counter]) -> None:
    """Copy the values of the cache's rows found in `wanted` into those rows, in place (and out of `wanted`)."""
    for split in manifest.splits.values():
        for shard in split.shards:
            if not wanted:
                return
            table = pq.read_table(inside(cache, shard.path))
            ids = table.select(list(ID_COLUMNS)).to_pylist()
            hits = [(i, key) for i, row in enumerate(ids) if (key := row_key(row, manifest.rejected_per_prompt)) in wanted]
            if not hits:
                continue
            values = [c for c in table.column_names if c != "index" and c not in ID_COLUMNS]
            for (_, key), found in zip(hits, table.select(values).take([i for i, _ in hits]).to_pylist()):
                for name, row in wanted.pop(key, []):  # a row repeated within one shard: the first copy
                    row.update(found)
                    counts[name][label] += 1


def is_scored(row: dict) -> bool:
    return "ref_chosen_logps" in row


def source_caches(out: Path, reuse_from: tuple[str, ...], scan_parent: bool, log: Callable) -> list[tuple[str, Path]]:
    """(label, local directory) of every candidate source: the complete caches under out's parent
    folder (as `cache ls` lists them), then each --reuse-from (a URL is mirrored locally first)."""
    from ..schemas.manifest import find_caches
    from .remote import is_remote, local_cache

    found = []
    if scan_parent:
        own = out.resolve()
        found += [(str(path), path) for path, problem in find_caches(out.parent)
                  if problem is None and path.resolve() != own]
    for location in reuse_from:
        try:  # a remote source is fetched and checked first: one missing or damaged costs only its rows
            path = Path(local_cache(location, log)) if is_remote(location) else Path(location)
        except (UserError, OSError) as error:
            problem = str(error).removeprefix(f"{location}: ").removeprefix(f"{location.rstrip('/')}: ")
            log(f"{location}: not reused: {problem}")
            continue
        if not (path / "manifest.json").is_file():
            log(f"{location}: not reused: not a complete mlx-dpo cache (no manifest.json)")
            continue
        if all(path.resolve() != p.resolve() for _, p in found):
            found.append((location, path))
    return found


def fill_from(sources: list[tuple[str, Path]], fields: dict, encoded: dict[str, list],
              rejected_per_prompt: int, log: Callable) -> dict[str, Counter]:
    """Give every encoded row a source of the same reference as `fields` scored its reference values,
    in place; per split, how many rows came from each source. Each source is used only after the full
    check of `cache verify` (sha256, schema, identity, values, accounting); every source left out is
    said so. Sources after the one that leaves no row to find are not read."""
    wanted, reference = _wanted(encoded, rejected_per_prompt), reference_fields(fields)
    counts = {split: Counter() for split in encoded}
    for label, path in sources:
        if not wanted:
            break
        try:
            manifest = read_manifest(path)
        except ValueError as error:  # an older schema, an unreadable manifest
            log(f"{label}: not reused: {error}")
            continue
        theirs = reference_fields(manifest.identity_fields)
        if theirs != reference:
            log(f"{label}: not reused: another reference ({describe_difference(theirs, reference)})")
            continue
        if problems := check_cache(path, manifest, full=True):
            log(f"{label}: not reused: fails verification ({problems[0]})")
            continue
        _take(label, path, manifest, wanted, counts)
    return counts
