"""manifest.json: what a cache holds. Written last, so its presence marks a complete cache."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_text_atomic
from .columns import SCHEMA_VERSION
from .identity import missing_fields

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
PARTIAL_NAME = "partial.json"  # a --shard-index job's record, read by `cache merge`
CACHE_SPLITS = ("train", "valid")  # the cache's split folders
REBUILD_NAME = ".mlx-dpo-rebuild"  # where precompute --overwrite builds the new cache (pipeline/rebuild.py)


class OldCache(ValueError):
    """A cache written under another schema version: rebuilt, never read."""


@dataclass
class ShardInfo:
    path: str  # relative to the cache directory
    rows: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    rows_in: int  # input rows this split draws: its `index` values plus its rejects' indices
    rows_cached: int
    rows_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)
    # The data split whose rows `index` counts: "train" and a --valid-fraction "valid" share one, so
    # between them they hold each of its rows exactly once.
    input_split: str = ""


@dataclass
class Manifest:
    schema_version: int
    identity: str
    identity_fields: dict
    reference_model: str  # as given on the command line; informative only
    max_length: int | None
    truncation_mode: str
    splits: dict[str, SplitInfo]
    rejects_file: str | None = None
    rejected_per_prompt: int = 1  # K: rejected answers per prompt (list columns when > 1)
    # Per split: {"formats": {name: rows}, "prompt_tail_dropped": rows, "prompt_tail_example": {index, dropped}}
    inputs: dict = field(default_factory=dict)
    created_at: str = ""
    mlx_dpo_version: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def relative_paths(self) -> list[str]:
        """Every file the manifest names, relative to the cache."""
        shards = [s.path for split in self.splits.values() for s in split.shards]
        return shards + ([self.rejects_file] if self.rejects_file else [])

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        splits = {
            name: SplitInfo(**{**info, "shards": [ShardInfo(**s) for s in info["shards"]]})
            for name, info in data["splits"].items()
        }
        return cls(**{**data, "splits": splits})


def write_json_atomic(path: Path, data) -> None:
    """Write JSON via a temp file and rename, so readers see the old file or the new one, never half."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def inside(cache_dir: Path, relative: str) -> Path:
    """`cache_dir / relative`, refusing absolute paths, `..` and symbolic links: a cache from
    elsewhere must not make us read (or anyone write) outside it. ValueError names the path."""
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts or not relative:
        raise ValueError(f"{cache_dir}: manifest path {relative!r} points outside the cache")
    path = Path(relative)
    if any((Path(cache_dir) / Path(*path.parts[: i + 1])).is_symlink() for i in range(len(path.parts))):
        raise ValueError(f"{cache_dir}: manifest path {relative!r} goes through a symbolic link")
    return Path(cache_dir) / path


def cache_links(cache_dir: Path) -> list[Path]:
    """Symbolic links among a cache's own entries: manifest, rejects file, partial record, the split
    folders and everything below them (without following links). A link would make a reader read,
    or a writer write, outside the cache."""
    cache_dir = Path(cache_dir)
    top = [cache_dir / name for name in (MANIFEST_NAME, REJECTS_NAME, PARTIAL_NAME, *CACHE_SPLITS)]
    links = [p for p in top if p.is_symlink()]
    for split in CACHE_SPLITS:
        if (cache_dir / split).is_dir() and not (cache_dir / split).is_symlink():
            for folder, dirs, files in os.walk(cache_dir / split):  # os.walk does not follow links
                links += [Path(folder) / name for name in sorted(dirs + files) if (Path(folder) / name).is_symlink()]
    return links


def refuse_links(cache_dir: Path) -> None:
    """ValueError naming the first symbolic link inside the cache (see cache_links)."""
    if links := cache_links(cache_dir):
        raise ValueError(f"{links[0]}: a symbolic link inside the cache; a cache holds plain files only (remove it)")


def parse_manifest(raw: bytes | str, where: str) -> Manifest:
    """A manifest from its JSON text. ValueError names `where`; OldCache (a ValueError) for a cache
    of another schema version, which is refused rather than read."""
    try:
        data = json.loads(raw)
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise ValueError(f"schema_version {version!r} is not a number")
        if version != SCHEMA_VERSION:
            raise OldCache(f"{where}: a cache of schema version {version}, this mlx-dpo reads version "
                           f"{SCHEMA_VERSION}; re-run precompute (with --overwrite) to rebuild it")
        manifest = Manifest.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        if isinstance(error, OldCache):
            raise
        raise ValueError(f"{where}/{MANIFEST_NAME}: unreadable manifest ({error})") from error
    if not isinstance(manifest.identity_fields, dict):
        raise ValueError(f"{where}/{MANIFEST_NAME}: unreadable manifest (identity_fields is not an object)")
    if missing := missing_fields(manifest.identity_fields):  # a forgery, or a cache from before these fields
        raise OldCache(f"{where}/{MANIFEST_NAME}: identity_fields lack {', '.join(missing)} (schema version "
                       f"{version} requires them); re-run precompute (with --overwrite) to rebuild it")
    return manifest


def read_manifest(cache_dir: Path) -> Manifest:
    """Read a complete cache's manifest, every path it names checked to lie inside the cache and no
    symbolic link anywhere in it (refuse_links). FileNotFoundError / ValueError name the path on
    failure (see parse_manifest)."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not Path(cache_dir).is_dir():
        raise FileNotFoundError(f"{cache_dir}: no such cache directory")
    if path.is_symlink():
        refuse_links(cache_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir}: not a complete mlx-dpo cache (no {MANIFEST_NAME}; run `mlx-dpo precompute`)")
    manifest = parse_manifest(path.read_bytes(), str(cache_dir))
    for relative in manifest.relative_paths():
        inside(cache_dir, relative)  # first: it names the manifest path that leads outside
    refuse_links(cache_dir)
    return manifest


# Never worth descending into when looking for caches (REBUILD_NAME: a cache being rebuilt, not one yet).
_SKIP_DIRS = {".git", "__pycache__", "node_modules", ".venv", "site-packages", REBUILD_NAME}


def find_caches(root: Path) -> list[tuple[Path, str | None]]:
    """(directory, problem) for every cache under `root`: problem is None for a complete cache,
    else why it cannot be used (no manifest yet, unreadable manifest)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if MANIFEST_NAME in filenames:
            found.append((here, None))
            dirnames.clear()  # a cache holds no other caches
            continue
        if any(f.startswith("part-") and f.endswith(".parquet") for f in filenames):
            parent = here.parent
            if not any(p == parent for p, _ in found):
                found.append((parent, "incomplete: shards but no manifest (re-run precompute to resume)"))
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not (here / d / "pyvenv.cfg").exists())
    return sorted(found)
