"""Is a cache whole? A cheap check (paths, sizes, row counts) that `train` always runs, and a full
one (sha256, schema, identity and its fields, values, every input row accounted for exactly once)
for `cache verify`."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .columns import ref_logps_schema
from .identity import DTYPES, identity_hash
from .manifest import Manifest, inside

__all__ = ["check_accounting", "check_cache", "coverage_problem", "file_sha256", "inside"]

def first_non_finite(table: pa.Table) -> tuple[str, int, float] | None:
    """The first NaN or inf among a shard table's reference log-prob columns (every `ref_*` column, the
    K rejected answers' lists flattened): (column, row position in `table`, value), or None."""
    for column in table.column_names:
        if not column.startswith("ref_"):
            continue
        values = table[column].combine_chunks()
        rows = None
        if pa.types.is_list(values.type):  # K rejected answers per row
            rows, values = pc.list_parent_indices(values), pc.list_flatten(values)
        bad = pc.invert(pc.is_finite(values))
        if pc.any(bad).as_py():
            at = pc.index(bad, True).as_py()
            return column, (at if rows is None else rows[at].as_py()), values[at].as_py()
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def check_cache(cache_dir: Path, manifest: Manifest, full: bool = False) -> list[str]:
    """Problems found, one line each naming the file (empty: the cache is whole)."""
    cache_dir, problems = Path(cache_dir), []
    for relative in manifest.relative_paths():
        try:
            inside(cache_dir, relative)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        return problems
    for name, split in manifest.splits.items():
        if split.rows_cached + split.rows_rejected != split.rows_in:
            problems.append(f"{cache_dir} [{name}]: {split.rows_in} rows in but {split.rows_cached} cached "
                            f"+ {split.rows_rejected} rejected")
        if sum(s.rows for s in split.shards) != split.rows_cached:
            problems.append(f"{cache_dir} [{name}]: shards hold {sum(s.rows for s in split.shards)} rows, "
                            f"manifest says {split.rows_cached} cached")
        for shard in split.shards:
            problems += _check_shard(cache_dir, manifest, shard, full)
    if full:
        problems += _check_identity(cache_dir, manifest)
    if full and not problems:
        problems += check_accounting(cache_dir, manifest)
    return problems


def _check_identity(cache_dir: Path, manifest: Manifest) -> list[str]:
    """The identity is the hash of its fields, and they name everything that changes the values."""
    where = f"{cache_dir}/manifest.json"
    fields = manifest.identity_fields
    if identity_hash(fields) != manifest.identity:
        return [f"{where}: identity {manifest.identity[:12]} is not the hash of its identity_fields "
                f"({identity_hash(fields)[:12]}); the manifest was edited"]
    if fields["dtype"] not in DTYPES:
        return [f"{where}: identity dtype {fields['dtype']!r} is not one of {', '.join(DTYPES)}"]
    return []


def coverage_problem(label: str, indices: list[int], rows: int) -> str | None:
    """None when `indices` hold each of 0..rows-1 exactly once; else a line naming the first row
    that is doubled, missing or out of range."""
    counts = Counter(indices)
    doubled = next((i for i in sorted(counts) if counts[i] > 1), None)
    missing = next((i for i in range(rows) if i not in counts), None)
    stray = next((i for i in sorted(counts) if not 0 <= i < rows), None)
    if doubled is None and missing is None and stray is None:
        return None
    first = (f"row {doubled} is there {counts[doubled]} times" if doubled is not None
             else f"row {missing} is missing" if missing is not None else f"row {stray} is not an input row")
    return (f"{label}: cached and rejected rows do not cover input rows 0..{rows - 1} exactly once "
            f"({first}; {len(indices):,} rows for {rows:,})")


def _check_shard(cache_dir: Path, manifest: Manifest, shard, full: bool) -> list[str]:
    try:
        path = inside(cache_dir, shard.path)
    except ValueError as error:
        return [str(error)]
    if path.is_dir():
        return [f"{path}: shard listed in the manifest is a folder, not a Parquet file"]
    if not path.is_file():
        return [f"{path}: shard listed in the manifest is missing"]
    if path.stat().st_size != shard.bytes:
        return [f"{path}: {path.stat().st_size} bytes, manifest says {shard.bytes} (truncated or replaced)"]
    if full and file_sha256(path) != shard.sha256:  # first: the most exact word on a changed file
        return [f"{path}: sha256 differs from the manifest (the file was changed or corrupted)"]
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        return [f"{path}: not a readable Parquet file ({error})"]
    if parquet.metadata.num_rows != shard.rows:
        return [f"{path}: {parquet.metadata.num_rows} rows, manifest says {shard.rows}"]
    return _check_contents(path, parquet, manifest) if full else []


def _check_contents(path: Path, parquet: pq.ParquetFile, manifest: Manifest) -> list[str]:
    schema = parquet.schema_arrow
    identity = (schema.metadata or {}).get(b"mlx_dpo.identity", b"").decode()
    if identity != manifest.identity:
        return [f"{path}: shard of another cache (identity {identity[:12] or 'none'}, manifest {manifest.identity[:12]})"]
    expected = ref_logps_schema(rejected_per_prompt=manifest.rejected_per_prompt)
    if not schema.remove_metadata().equals(expected.remove_metadata()):
        return [f"{path}: schema differs from schema version {manifest.schema_version} "
                f"(columns: {', '.join(f'{f.name}: {f.type}' for f in schema)})"]
    try:
        table = parquet.read()
    except (OSError, pa.ArrowException) as error:
        return [f"{path}: unreadable data ({error})"]
    problems = []
    if (found := first_non_finite(table)) is not None:
        column, position, _ = found
        problems.append(f"{path}: row {table['index'][position].as_py()}: {column} is not finite")
    return problems


def check_accounting(cache_dir: Path, manifest: Manifest) -> list[str]:
    """Every input row is in exactly one shard or in the rejects file, with its reason; cache splits
    drawn from one data split (train and a --valid-fraction valid) share its rows between them."""
    rejected: dict[str, list[int]] = {name: [] for name in manifest.splits}
    if manifest.rejects_file:
        try:
            rejects_path = inside(cache_dir, manifest.rejects_file)
            for line in rejects_path.read_text().splitlines():
                record = json.loads(line)
                rejected.setdefault(record["split"], []).append(record["index"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            return [f"{cache_dir / manifest.rejects_file}: unreadable rejects file ({error})"]
    problems, groups = [], {}
    for name, split in manifest.splits.items():
        cached = pq.read_table([inside(cache_dir, s.path) for s in split.shards], columns=["index"])["index"] \
            if split.shards else pa.array([], pa.int64())
        group = groups.setdefault(split.input_split or name, {"splits": [], "indices": [], "rows": 0})
        group["splits"].append(name)
        group["indices"] += cached.to_pylist() + rejected.get(name, [])
        group["rows"] += split.rows_in
        if len(rejected.get(name, [])) != split.rows_rejected:
            problems.append(f"{cache_dir} [{name}]: rejects file lists {len(rejected.get(name, []))} rows, "
                            f"manifest says {split.rows_rejected}")
    for source, group in groups.items():
        label = f"{cache_dir} [{', '.join(group['splits'])}]" + (f" (data split {source!r})" if group["splits"] != [source] else "")
        if (problem := coverage_problem(label, group["indices"], group["rows"])) is not None:
            problems.append(problem)
    return problems
