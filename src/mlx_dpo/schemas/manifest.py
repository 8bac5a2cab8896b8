"""manifest.json: what a cache holds. Written last, so its presence marks a complete cache."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import write_text_atomic

MANIFEST_NAME = "manifest.json"


@dataclass
class ShardInfo:
    path: str  # relative to the cache directory
    rows: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    rows_in: int
    rows_cached: int
    rows_rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


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
    created_at: str = ""
    mlx_dpo_version: str = ""

    def to_json(self) -> dict:
        return asdict(self)

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


def read_manifest(cache_dir: Path) -> Manifest:
    """Read a complete cache's manifest; FileNotFoundError / ValueError name the path on failure."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not Path(cache_dir).is_dir():
        raise FileNotFoundError(f"{cache_dir}: no such cache directory")
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir}: not a complete mlx-dpo cache (no {MANIFEST_NAME}; run `mlx-dpo precompute`)")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: unreadable manifest ({error})") from error
