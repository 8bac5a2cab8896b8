"""The contract between the pipeline and the trainer. Imports pyarrow only, never mlx."""

from .columns import SCHEMA_VERSION, ref_logps_schema
from .identity import CacheMismatch, describe_difference, identity_hash, tokenizer_fingerprint
from .manifest import Manifest, ShardInfo, SplitInfo, read_manifest, write_json_atomic
from .sequence import TRUNCATION_MODES, truncate_sequence

__all__ = [
    "SCHEMA_VERSION",
    "TRUNCATION_MODES",
    "CacheMismatch",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "describe_difference",
    "identity_hash",
    "read_manifest",
    "ref_logps_schema",
    "tokenizer_fingerprint",
    "truncate_sequence",
    "write_json_atomic",
]
