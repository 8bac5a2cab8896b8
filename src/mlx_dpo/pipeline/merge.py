"""`mlx-dpo cache merge OUT PART...`: combine the shard sets of `--num-shards N --shard-index i` jobs."""

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..schemas import SCHEMA_VERSION, Manifest, describe_difference, read_manifest
from ..schemas.atomic import atomic_path, make_dirs
from ..schemas.manifest import MANIFEST_NAME, PARTIAL_NAME, refuse_links
from .lock import cache_lock
from .shards import finish, is_complete, owned, plan

# What every part must agree on to be pieces of one cache.
_SHARED = ("identity", "rows_per_shard", "num_shards", "rows_in", "rejected_per_prompt")


def _refuse_links(folder: Path) -> None:
    try:
        refuse_links(folder)  # the readers' and precompute's check: nothing read or written outside
    except ValueError as error:
        raise UserError(str(error)) from error


def _read_partial(part: Path) -> dict:
    _refuse_links(part)
    path = part / PARTIAL_NAME
    if not path.is_file():
        raise UserError(f"{part}: not the output of `precompute --num-shards N --shard-index i` (no {PARTIAL_NAME})")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: unreadable ({error})") from error
    if record.get("identity_fields", {}).get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{part}: written by another mlx-dpo (cache schema version "
                        f"{record.get('identity_fields', {}).get('schema_version')}, this one {SCHEMA_VERSION}); "
                        "re-run precompute for that shard set")
    return record


def _check_parts(parts: list[Path], records: list[dict]) -> None:
    first = records[0]
    for part, record in zip(parts[1:], records[1:]):
        for key in _SHARED:
            if record[key] != first[key]:
                detail = (describe_difference(first["identity_fields"], record["identity_fields"], str(part))
                          if key == "identity" else f"{key}: {first[key]} vs {record[key]}")
                raise UserError(f"{part}: not a piece of the same cache as {parts[0]} ({detail})")
    indices = sorted(r["shard_index"] for r in records)
    if indices != list(range(first["num_shards"])):
        raise UserError(f"need shard indices 0..{first['num_shards'] - 1} exactly once, got {indices}")


def merge(out: Path, parts: list[Path], log=print) -> Manifest:
    records = [_read_partial(part) for part in parts]
    _check_parts(parts, records)
    base = {key: records[0][key] for key in ("identity", "identity_fields", "reference_model", "max_length",
                                             "truncation_mode", "rejected_per_prompt", "rows_in", "input_splits")}
    base["inputs"] = records[0].get("inputs", {})
    tasks = plan(base["rows_in"], records[0]["rows_per_shard"])
    make_dirs(out)
    with cache_lock(out):
        _refuse_links(out)
        if (out / MANIFEST_NAME).is_file():
            try:
                existing = read_manifest(out)
            except ValueError as error:
                raise UserError(f"{error}; merge into an empty directory") from error
            if existing.identity != base["identity"]:
                raise UserError(f"{out}: holds another cache ({existing.identity[:12]}); merge into an empty directory")
            log(f"{out} already holds this cache ({existing.identity[:12]}); nothing to merge.")
            return existing
        for part, record in zip(parts, records):
            for task in owned(tasks, record["num_shards"], record["shard_index"]):
                if not is_complete(task, part, base["identity"]):
                    raise UserError(f"{task.path(part)}: missing or incomplete; rerun that job (it resumes)")
                for source, target in ((task.rejects_path(part), task.rejects_path(out)), (task.path(part), task.path(out))):
                    with atomic_path(target) as tmp:
                        shutil.copyfile(source, tmp)
        manifest = finish(out, tasks, base)
    log(f"Merged {len(parts)} shard sets into {out} ({base['identity'][:12]}: "
        f"{sum(len(s.shards) for s in manifest.splits.values())} shards)")
    return manifest
