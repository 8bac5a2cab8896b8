"""Shards as units of work: which process computes which, and how complete shards become a cache.

Shard g (counted across splits, train first) covers a fixed range of input rows and belongs to worker
g % workers. A single process owns them all; `mlx.launch -n N` ranks or `--num-shards N --shard-index i`
jobs each own every N-th. Whoever finishes last (rank 0, or `cache merge`) reads the complete shards
back from disk and writes the rejects file and the manifest.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..schemas import SCHEMA_VERSION, Manifest, SplitInfo, write_json_atomic
from ..schemas.atomic import fsync_dir
from ..schemas.manifest import CACHE_SPLITS, MANIFEST_NAME, PARTIAL_NAME, REJECTS_NAME
from ..schemas.verify import check_accounting
from .sources import EVAL_CACHE_SPLIT
from .write import completion_tokens, shard_info, shard_metadata, write_jsonl_atomic

assert EVAL_CACHE_SPLIT in CACHE_SPLITS
# The files of the cache layout, and the temp files their atomic writes leave when killed.
_SPLIT_FILE = re.compile(r"part-(\d{5})\.(parquet|rejects\.jsonl)")
_TEMP_FILE = re.compile(r"\.(manifest|rejects|partial|part-\d{5}(\.rejects)?)\.\d+\.tmp(\.\w+)?")


@dataclass(frozen=True)
class ShardTask:
    split: str
    number: int  # within the split: part-NNNNN
    start: int  # first input row of the split it covers
    rows: int

    def path(self, out: Path) -> Path:
        return out / self.split / f"part-{self.number:05d}.parquet"

    def rejects_path(self, out: Path) -> Path:
        return self.path(out).with_suffix(".rejects.jsonl")

    def row_range(self) -> dict:
        """Its place in the plan, stored in the shard: positions start..start+rows-1 of the split."""
        return {"split": self.split, "start": self.start, "rows": self.rows}


def plan(rows_in: dict[str, int], rows_per_shard: int) -> list[ShardTask]:
    """Every shard of every split, in a fixed order (an empty split still gets one, empty, shard)."""
    return [
        ShardTask(split, number, start, min(rows_per_shard, n - start) if n else 0)
        for split, n in rows_in.items()
        for number, start in enumerate(range(0, max(n, 1), rows_per_shard))
    ]


def owned(tasks: list[ShardTask], workers: int, worker: int) -> list[ShardTask]:
    return [task for g, task in enumerate(tasks) if g % workers == worker]


def is_complete(task: ShardTask, out: Path, identity: str) -> bool:
    """The shard is written, for this identity and this very row range (another --rows-per-shard
    gives other ranges under the same file names), in both its files: the Parquet and its rejects
    sidecar each carry them, so neither is ever paired with the other's of another plan."""
    part, sidecar = task.path(out), task.rejects_path(out)
    stamp = (identity, task.row_range())
    return part.exists() and sidecar.exists() and shard_metadata(part) == stamp and read_sidecar(sidecar)[0] == stamp


_SIDECAR_KEY = "mlx_dpo.shard"  # the sidecar's first line: {"mlx_dpo.shard": {"identity", "row_range"}}


def write_sidecar(task: ShardTask, out: Path, identity: str, rejects: list[dict]) -> None:
    """The shard's rejects, after a first line naming the identity and row range they were made for."""
    header = {_SIDECAR_KEY: {"identity": identity, "row_range": task.row_range()}}
    write_jsonl_atomic([header, *rejects], task.rejects_path(out))


def read_sidecar(path: Path) -> tuple[tuple[str, dict] | None, list[dict]]:
    """((identity, row range) or None when unstamped or unreadable, reject records) of a sidecar."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        stamp = records[0][_SIDECAR_KEY]
        return (stamp["identity"], stamp["row_range"]), records[1:]
    except (OSError, ValueError, IndexError, KeyError, TypeError):
        return None, []


def layout_files(out: Path, any_kind: bool = False) -> list[Path]:
    """The cache's own files in `out`: manifest, rejects, partial record and <split>/part-NNNNN.*
    of the cache's splits. Anything else in the folder is not ours to touch. `any_kind`: also what
    is at those paths but is not a regular file (a folder, a link)."""
    def ours(path: Path) -> bool:
        return path.is_file() or (any_kind and (path.exists() or path.is_symlink()))

    files = [out / name for name in (MANIFEST_NAME, REJECTS_NAME, PARTIAL_NAME) if ours(out / name)]
    for split in CACHE_SPLITS:
        if (out / split).is_dir() and not (out / split).is_symlink():
            files += sorted(p for p in (out / split).iterdir() if _SPLIT_FILE.fullmatch(p.name) and ours(p))
    return files


def temp_files(out: Path) -> list[Path]:
    """Half-written files of our atomic writes (a writer killed mid-write leaves them); a folder of
    such a name is not one, and stays."""
    folders = [out] + [out / split for split in CACHE_SPLITS if (out / split).is_dir()]
    return [p for folder in folders for p in folder.iterdir()
            if _TEMP_FILE.fullmatch(p.name) and (p.is_symlink() or not p.is_dir())]


def is_layout_name(relative: str) -> bool:
    """Whether a '/'-separated path relative to a cache names one of its own files or their temp files
    (what layout_files and temp_files find there): a cache's writer may remove what it does not list."""
    folder, _, name = relative.rpartition("/")
    if folder and folder not in CACHE_SPLITS:
        return False
    if _TEMP_FILE.fullmatch(name):
        return True
    if folder:
        return bool(_SPLIT_FILE.fullmatch(name))
    return name in (MANIFEST_NAME, REJECTS_NAME, PARTIAL_NAME)


def clear_layout(out: Path) -> None:
    """Remove the cache's own files, the manifest first (from then on no reader takes the rest for
    a complete cache), and split folders left empty; other files stay."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    fsync_dir(out)
    for path in layout_files(out) + temp_files(out):
        path.unlink(missing_ok=True)
    for split in CACHE_SPLITS:
        if (out / split).is_dir() and not any((out / split).iterdir()):
            (out / split).rmdir()


def remove_unplanned(out: Path, tasks: list[ShardTask]) -> None:
    """Shard files of an earlier plan (another --rows-per-shard) at numbers this plan does not use."""
    planned = {(t.split, t.number) for t in tasks}
    for path in layout_files(out):
        match = _SPLIT_FILE.fullmatch(path.name)
        if match and (path.parent.name, int(match.group(1))) not in planned:
            path.unlink()


def reason_counts(reasons) -> Counter:
    return Counter(reason.split(" (")[0] for reason in reasons)  # "prompt fills max_length (40 >= 32)"


def collect(out: Path, tasks: list[ShardTask], rows_in: dict[str, int],
            input_splits: dict[str, str]) -> tuple[dict[str, SplitInfo], list[dict]]:
    """SplitInfo per split and every reject record, from the complete shards on disk."""
    infos, all_rejects = {}, []
    for split, n in rows_in.items():
        mine = [t for t in tasks if t.split == split]
        shards = [shard_info(t.path(out), out) for t in mine]
        rejects = [record for t in mine for record in read_sidecar(t.rejects_path(out))[1]]
        infos[split] = SplitInfo(
            rows_in=n,
            rows_cached=sum(s.rows for s in shards),
            rows_rejected=len(rejects),
            rejected_by_reason=dict(reason_counts(r["reason"] for r in rejects)),
            completion_tokens=sum(completion_tokens(out / s.path) for s in shards),
            shards=shards,
            input_split=input_splits[split],
        )
        all_rejects += rejects
    return infos, all_rejects


def finish(out: Path, tasks: list[ShardTask], base: dict) -> Manifest:
    """Rejects file, then the manifest (last: it marks the cache complete), once every input row is
    cached or rejected exactly once and every split has cached rows. `base` holds the manifest's
    run-level fields: identity, identity_fields, reference_model, max_length, truncation_mode,
    rejected_per_prompt, rows_in, input_splits (cache split -> data split), inputs (what encoding
    found per split)."""
    missing = [str(t.path(out)) for t in tasks if not is_complete(t, out, base["identity"])]
    if missing:
        raise UserError(f"{out}: {len(missing)} shard(s) missing or incomplete, e.g. {missing[0]}")
    infos, rejects = collect(out, tasks, base["rows_in"], base["input_splits"])
    write_jsonl_atomic(rejects, out / REJECTS_NAME)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, identity=base["identity"], identity_fields=base["identity_fields"],
        reference_model=base["reference_model"], max_length=base["max_length"],
        truncation_mode=base["truncation_mode"], splits=infos, rejects_file=REJECTS_NAME,
        rejected_per_prompt=base["rejected_per_prompt"], inputs=base.get("inputs", {}),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), mlx_dpo_version=__version__,
    )
    if problems := check_accounting(out, manifest):
        raise UserError(f"{problems[0]}; nothing was marked complete: re-run precompute with --overwrite")
    for name, info in infos.items():
        if info.rows_cached == 0:
            reasons = ", ".join(f"{n:,} {reason}" for reason, n in Counter(info.rejected_by_reason).most_common(3))
            raise UserError(f"{out} [{name}]: none of its {info.rows_in:,} rows could be cached ({reasons}); "
                            f"each row's reason is in {out / REJECTS_NAME}")
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def write_partial(out: Path, base: dict, rows_per_shard: int, workers: int, worker: int) -> None:
    write_json_atomic(out / PARTIAL_NAME, {**base, "rows_per_shard": rows_per_shard,
                                           "num_shards": workers, "shard_index": worker})
