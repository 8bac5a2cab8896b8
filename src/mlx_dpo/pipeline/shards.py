"""Shards as units of work: which process computes which, and how complete shards become a cache.

Shard g (counted across splits, train first) covers a fixed range of input rows and belongs to worker
g % workers. A single process owns them all; `mlx.launch -n N` ranks or `--num-shards N --shard-index i`
jobs each own every N-th. Whoever finishes last (rank 0, or `cache merge`) reads the complete shards
back from disk and writes the rejects file and the manifest.
"""

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..schemas import SCHEMA_VERSION, Manifest, SplitInfo, write_json_atomic
from ..schemas.manifest import MANIFEST_NAME
from .write import completion_tokens, shard_identity, shard_info, write_jsonl_atomic

PARTIAL_NAME = "partial.json"  # a --shard-index job's record, read by `cache merge`


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
    part = task.path(out)
    return part.exists() and task.rejects_path(out).exists() and shard_identity(part) == identity


def reason_counts(reasons) -> Counter:
    return Counter(reason.split(" (")[0] for reason in reasons)  # "prompt fills max_length (40 >= 32)"


def collect(out: Path, tasks: list[ShardTask], rows_in: dict[str, int]) -> tuple[dict[str, SplitInfo], list[dict]]:
    """SplitInfo per split and every reject record, from the complete shards on disk."""
    infos, all_rejects = {}, []
    for split, n in rows_in.items():
        mine = [t for t in tasks if t.split == split]
        shards = [shard_info(t.path(out), out) for t in mine]
        rejects = [json.loads(line) for t in mine for line in t.rejects_path(out).read_text().splitlines() if line]
        infos[split] = SplitInfo(
            rows_in=n,
            rows_cached=sum(s.rows for s in shards),
            rows_rejected=len(rejects),
            rejected_by_reason=dict(reason_counts(r["reason"] for r in rejects)),
            completion_tokens=sum(completion_tokens(out / s.path) for s in shards),
            shards=shards,
        )
        all_rejects += rejects
    return infos, all_rejects


def finish(out: Path, tasks: list[ShardTask], base: dict) -> Manifest:
    """Rejects file, then the manifest (last: it marks the cache complete). `base` holds the
    manifest's run-level fields: identity, identity_fields, reference_model, max_length,
    truncation_mode, rejected_per_prompt, rows_in."""
    missing = [str(t.path(out)) for t in tasks if not is_complete(t, out, base["identity"])]
    if missing:
        raise UserError(f"{out}: {len(missing)} shard(s) missing or incomplete, e.g. {missing[0]}")
    infos, rejects = collect(out, tasks, base["rows_in"])
    write_jsonl_atomic(rejects, out / "rejects.jsonl")
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, identity=base["identity"], identity_fields=base["identity_fields"],
        reference_model=base["reference_model"], max_length=base["max_length"],
        truncation_mode=base["truncation_mode"], splits=infos, rejects_file="rejects.jsonl",
        rejected_per_prompt=base["rejected_per_prompt"],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), mlx_dpo_version=__version__,
    )
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def write_partial(out: Path, base: dict, rows_per_shard: int, workers: int, worker: int) -> None:
    write_json_atomic(out / PARTIAL_NAME, {**base, "rows_per_shard": rows_per_shard,
                                           "num_shards": workers, "shard_index": worker})
