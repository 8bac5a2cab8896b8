"""Is a cache whole? A cheap check (paths, sizes, row counts) that `train` always runs, and a full
one (sha256, schema, identity, values, every input row accounted for) for `cache verify`."""

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .columns import ref_logps_schema
from .manifest import Manifest

LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def inside(cache_dir: Path, relative: str) -> Path:
    """`cache_dir / relative`, refusing absolute paths, `..` and symbolic links: a cache from
    elsewhere must not make us read (or anyone write) outside it."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{cache_dir}: manifest path {relative!r} points outside the cache")
    if any((Path(cache_dir) / Path(*path.parts[: i + 1])).is_symlink() for i in range(len(path.parts))):
        raise ValueError(f"{cache_dir}: manifest path {relative!r} goes through a symbolic link")
    return Path(cache_dir) / path


def check_cache(cache_dir: Path, manifest: Manifest, full: bool = False) -> list[str]:
    """Problems found, one line each naming the file (empty: the cache is whole)."""
    cache_dir, problems = Path(cache_dir), []
    for name, split in manifest.splits.items():
        if split.rows_cached + split.rows_rejected != split.rows_in:
            problems.append(f"{cache_dir} [{name}]: {split.rows_in} rows in but {split.rows_cached} cached "
                            f"+ {split.rows_rejected} rejected")
        if sum(s.rows for s in split.shards) != split.rows_cached:
            problems.append(f"{cache_dir} [{name}]: shards hold {sum(s.rows for s in split.shards)} rows, "
                            f"manifest says {split.rows_cached} cached")
        for shard in split.shards:
            problems += _check_shard(cache_dir, manifest, shard, full)
    if full and not problems:
        problems += _check_accounting(cache_dir, manifest)
    return problems


def _check_shard(cache_dir: Path, manifest: Manifest, shard, full: bool) -> list[str]:
    try:
        path = inside(cache_dir, shard.path)
    except ValueError as error:
        return [str(error)]
    if not path.is_file():
        return [f"{path}: shard listed in the manifest is missing"]
    if path.stat().st_size != shard.bytes:
        return [f"{path}: {path.stat().st_size} bytes, manifest says {shard.bytes} (truncated or replaced)"]
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        return [f"{path}: not a readable Parquet file ({error})"]
    if parquet.metadata.num_rows != shard.rows:
        return [f"{path}: {parquet.metadata.num_rows} rows, manifest says {shard.rows}"]
    if not full:
        return []
    if file_sha256(path) != shard.sha256:
        return [f"{path}: sha256 differs from the manifest (the file was changed or corrupted)"]
    return _check_contents(path, parquet, manifest)


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
    for column in LOGPS_COLUMNS:
        values = table[column]
        if pa.types.is_list(values.type):  # K rejected: one value per answer
            values = pc.list_flatten(values)
            bad = pc.invert(pc.is_finite(values))
            if pc.any(bad).as_py():
                problems.append(f"{path}: {column} has a non-finite value")
            continue
        bad = pc.invert(pc.is_finite(values))
        if pc.any(bad).as_py():
            row = table["index"][pc.index(bad, True).as_py()].as_py()
            problems.append(f"{path}: row {row}: {column} is not finite")
    return problems


def _check_accounting(cache_dir: Path, manifest: Manifest) -> list[str]:
    """Every input row is in exactly one shard or in the rejects file, with its reason."""
    rejected: dict[str, list[int]] = {name: [] for name in manifest.splits}
    if manifest.rejects_file:
        try:
            rejects_path = inside(cache_dir, manifest.rejects_file)
            for line in rejects_path.read_text().splitlines():
                record = json.loads(line)
                rejected.setdefault(record["split"], []).append(record["index"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            return [f"{cache_dir / manifest.rejects_file}: unreadable rejects file ({error})"]
    problems = []
    for name, split in manifest.splits.items():
        cached = pq.read_table([inside(cache_dir, s.path) for s in split.shards], columns=["index"])["index"] \
            if split.shards else pa.array([], pa.int64())
        indices = sorted(cached.to_pylist() + rejected.get(name, []))
        if indices != list(range(split.rows_in)):
            problems.append(f"{cache_dir} [{name}]: cached and rejected rows do not cover input rows "
                            f"0..{split.rows_in - 1} exactly once")
        if len(rejected.get(name, [])) != split.rows_rejected:
            problems.append(f"{cache_dir} [{name}]: rejects file lists {len(rejected.get(name, []))} rows, "
                            f"manifest says {split.rows_rejected}")
    return problems
