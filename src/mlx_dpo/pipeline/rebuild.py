"""`precompute --overwrite` builds the new cache beside the old one and swaps it in only when complete.

The new cache is built in OUT/.mlx-dpo-rebuild (find_caches never looks inside, so neither `cache ls`
nor reuse take it for a cache), under OUT's lock. Until the swap the old cache at OUT is untouched and
passes `cache verify`: a rebuild that fails, is interrupted or killed leaves it as it was, and leaves
its finished shards for the next `--overwrite` to resume. The swap, once the new cache is complete:

1. a record of the new cache's files, fsynced: from here on the swap only goes forward;
2. OUT's manifest removed (readers now refuse OUT instead of mixing old and new files);
3. the old cache's files the new one lacks removed, the new ones renamed in, the manifest last.

A process killed during the swap leaves the record; the next precompute of OUT finishes the swap
before anything else. A folder at a cache file's path is removed; what would stop a rename (a split
folder that is a file or a link) is refused, in one line, before the old manifest goes. Files in OUT that are not the cache's own (schemas.manifest's layout) stay.
"""

import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..schemas import write_json_atomic
from ..schemas.atomic import fsync_dir, make_dirs
from ..schemas.manifest import CACHE_SPLITS, MANIFEST_NAME, PARTIAL_NAME, REBUILD_NAME, refuse_links
from .shards import clear_layout, layout_files, temp_files
from .write import shard_identity

SWAP_RECORD = "swap.json"  # {"files": the new cache's files, relative, its manifest (or partial record) last}


def rebuild_dir(out: Path) -> Path:
    return Path(out) / REBUILD_NAME


def prepare(out: Path, identity: str) -> Path:
    """The folder the rebuild writes into: created, half-written files and shards of other inputs
    cleared (a failed rebuild of the same inputs is resumed from its complete shards)."""
    work = rebuild_dir(out)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise UserError(f"{work}: not a folder of mlx-dpo's (remove it): precompute --overwrite builds the new cache there")
    make_dirs(work)
    try:
        refuse_links(work)
    except ValueError as error:
        raise UserError(str(error)) from error
    if any(p.suffix == ".parquet" and shard_identity(p) != identity for p in layout_files(work)):
        clear_layout(work)
    for path in temp_files(work) + [work / MANIFEST_NAME, work / PARTIAL_NAME]:
        path.unlink(missing_ok=True)  # a manifest here without a swap record was never committed
    return work


def discard(out: Path) -> None:
    """Remove an unfinished rebuild's folder (a precompute of OUT without --overwrite: no rebuild will
    resume it). Call after finish_swap, which leaves no committed rebuild behind."""
    work = rebuild_dir(out)
    if work.is_dir() and not work.is_symlink():
        shutil.rmtree(work)
        fsync_dir(out)


def swap_in(out: Path) -> None:
    """Replace the cache at `out` with the complete one in rebuild_dir(out) (its manifest or, for a
    --shard-index job, its partial record written), durably; see the module docstring."""
    work = rebuild_dir(out)
    commit = MANIFEST_NAME if (work / MANIFEST_NAME).is_file() else PARTIAL_NAME
    files = sorted(p.relative_to(work).as_posix() for p in layout_files(work) if p.name != commit)
    _check_targets(out, files + [commit])  # before the record: a swap that cannot finish never starts
    write_json_atomic(work / SWAP_RECORD, {"files": files + [commit]})
    finish_swap(out)


def _check_targets(out: Path, files: list[str]) -> None:
    """Refuse, before anything is removed, a swap whose renames would fail or leave OUT: a folder on the
    way to a new file that is not a folder (a file, a link). A cache file's path that is a folder is no
    obstacle: _remove removes it."""
    for name in files:
        target = out / name
        for folder in reversed(target.relative_to(out).parents[:-1]):  # e.g. OUT/train
            path = out / folder
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise UserError(f"{path}: not a folder, where the rebuilt cache's {name} goes; remove it and "
                                f"rerun precompute --out {out}")


def _remove(path: Path) -> None:
    """Remove what is at a cache file's path, a folder too (a cache file replaced by hand): the path is
    the cache's, and the swap puts a file there or none. A link is removed, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        fsync_dir(path.parent)
    path.unlink(missing_ok=True)


def finish_swap(out: Path) -> bool:
    """Complete a swap whose record is in rebuild_dir(out) (all of it, or what a killed process left);
    True if there was one. Each step can be repeated, so a crash here is finished by the next call.
    Raises UserError (one line naming the path) if OUT's state stops it; nothing is removed then."""
    work = rebuild_dir(out)
    if not (work / SWAP_RECORD).is_file() or work.is_symlink():
        return False
    files = json.loads((work / SWAP_RECORD).read_text())["files"]
    _check_targets(out, files)
    try:
        _swap(out, work, files)
    except OSError as error:  # e.g. permissions: the next precompute of OUT resumes the swap
        where = error.filename or work
        raise UserError(f"{where}: {error.strerror or error}: the swap of the rebuilt cache in {work} into {out} "
                        f"stopped; fix that and rerun precompute --out {out} to finish it") from error
    return True


def _swap(out: Path, work: Path, files: list[str]) -> None:
    if (work / files[-1]).is_file():  # the new manifest is not in yet: OUT's is the old cache's
        for name in (MANIFEST_NAME, PARTIAL_NAME):
            _remove(out / name)
        fsync_dir(out)
    keep = set(files)
    for path in layout_files(out, any_kind=True) + temp_files(out):
        if path.relative_to(out).as_posix() not in keep:
            _remove(path)
    for name in files:
        if name == files[-1]:  # every other rename is durable before the manifest's
            for folder in [out] + [out / split for split in CACHE_SPLITS if (out / split).is_dir()]:
                fsync_dir(folder)
        if (work / name).is_file():
            make_dirs((out / name).parent)
            if (out / name).is_dir() and not (out / name).is_symlink():
                _remove(out / name)
            os.replace(work / name, out / name)
    fsync_dir(out)
    for split in CACHE_SPLITS:  # a split the old cache had and the new one lacks
        if (out / split).is_dir() and not any((out / split).iterdir()):
            (out / split).rmdir()
    shutil.rmtree(work)  # our own folder: the record, emptied split folders
    fsync_dir(out)
