"""Arrow schema of a reference-cache shard (TRL's column names)."""

import json

import pyarrow as pa

# Bump when a column is added, removed or changes meaning; part of the cache identity.
SCHEMA_VERSION = 1

_TOKEN_LIST = pa.list_(pa.int32())

REF_LOGPS_FIELDS = [
    pa.field("index", pa.int64(), nullable=False),  # 0-based row in the input split
    pa.field("prompt_ids", _TOKEN_LIST, nullable=False),
    pa.field("chosen_ids", _TOKEN_LIST, nullable=False),
    pa.field("rejected_ids", _TOKEN_LIST, nullable=False),
    # Sums of reference log-probs over the completion tokens scored after truncation.
    pa.field("ref_chosen_logps", pa.float32(), nullable=False),
    pa.field("ref_rejected_logps", pa.float32(), nullable=False),
    pa.field("n_chosen_tokens", pa.int32(), nullable=False),
    pa.field("n_rejected_tokens", pa.int32(), nullable=False),
]


def ref_logps_schema(identity: str | None = None, identity_fields: dict | None = None) -> pa.Schema:
    """The shard schema, with the cache identity in its file-level metadata."""
    metadata = {"mlx_dpo.schema_version": str(SCHEMA_VERSION)}
    if identity is not None:
        metadata["mlx_dpo.identity"] = identity
    if identity_fields is not None:
        metadata["mlx_dpo.identity_fields"] = json.dumps(identity_fields, sort_keys=True)
    return pa.schema(REF_LOGPS_FIELDS, metadata=metadata)
