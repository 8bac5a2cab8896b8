"""Arrow tables -> Parquet shards, atomically, with their checksums."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - registers pa.compute
import pyarrow.parquet as pq

from ..schemas import ShardInfo
from ..schemas.atomic import atomic_path, write_text_atomic
from ..schemas.columns import ROW_RANGE_KEY
from ..schemas.verify import file_sha256


def write_shard(table: pa.Table, path: Path, cache_dir: Path, row_group_rows: int = 256) -> ShardInfo:
    """Write via temp file + fsync + rename (+ fsync of the folder): a shard on disk is always complete."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_rows, compression="zstd")
    return shard_info(path, cache_dir)


def shard_info(path: Path, cache_dir: Path) -> ShardInfo:
    return ShardInfo(
        path=str(path.relative_to(cache_dir)),
        rows=pq.read_metadata(path).num_rows,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
    )


def completion_tokens(path: Path) -> int:
    table = pq.read_table(path, columns=["n_chosen_tokens", "n_rejected_tokens"])
    columns = [pa.compute.list_flatten(table[c]) if pa.types.is_list(table[c].type) else table[c]
               for c in table.column_names]  # K rejected: lists of counts
    return sum(pa.compute.sum(column).as_py() or 0 for column in columns)


def write_jsonl_atomic(records: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def shard_identity(path: Path) -> str | None:
    """The identity stored in a shard's schema metadata, or None if unreadable."""
    return shard_metadata(path)[0]


def shard_metadata(path: Path) -> tuple[str | None, dict | None]:
    """(identity, row range) stored in a shard's schema metadata; None for what is unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None, None
    identity = metadata.get(b"mlx_dpo.identity")
    try:
        row_range = json.loads(metadata[ROW_RANGE_KEY.encode()])
    except (KeyError, ValueError):
        row_range = None
    return (identity.decode() if identity else None), row_range
