"""Arrow schema of a reference-cache shard (TRL's column names)."""

import json

import pyarrow as pa

# Bump when a column or the manifest changes; part of the cache identity. Caches of another
# version are refused with "re-run precompute". 2: dtype in the identity, shard row ranges,
# SplitInfo.input_split. 3: weights hashed by tensor content, the tokenizer by its serialization,
# shard rejects sidecars stamped with identity and row range.
SCHEMA_VERSION = 3

_TOKEN_LIST = pa.list_(pa.int32())
ROW_RANGE_KEY = "mlx_dpo.row_range"

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
    # LD-DPO: the part of each sum past the shorter completion's length (K = 1 caches only).
    pa.field("ref_chosen_tail_logps", pa.float32(), nullable=False),
    pa.field("ref_rejected_tail_logps", pa.float32(), nullable=False),
]
LD_COLUMNS = ("ref_chosen_tail_logps", "ref_rejected_tail_logps")


# With K rejected answers per prompt these columns hold one value per answer.
SEVERAL_REJECTED_TYPES = {
    "rejected_ids": pa.list_(_TOKEN_LIST),
    "ref_rejected_logps": pa.list_(pa.float32()),
    "n_rejected_tokens": pa.list_(pa.int32()),
}


def ref_logps_schema(identity: str | None = None, identity_fields: dict | None = None,
                     rejected_per_prompt: int = 1, row_range: dict | None = None) -> pa.Schema:
    """The shard schema, with the cache identity in its file-level metadata. With
    rejected_per_prompt K > 1 the rejected columns are lists of K values per row. `row_range`
    ({"split", "start", "rows"}: positions in the split's input rows) is the shard's place in the
    shard plan; a resumed run reuses a shard only where its plan has the same range."""
    metadata = {"mlx_dpo.schema_version": str(SCHEMA_VERSION)}
    if row_range is not None:
        metadata[ROW_RANGE_KEY] = json.dumps(row_range, sort_keys=True)
    if identity is not None:
        metadata["mlx_dpo.identity"] = identity
    if identity_fields is not None:
        metadata["mlx_dpo.identity_fields"] = json.dumps(identity_fields, sort_keys=True)
    fields = REF_LOGPS_FIELDS
    if rejected_per_prompt > 1:
        fields = [pa.field(f.name, SEVERAL_REJECTED_TYPES[f.name], nullable=False)
                  if f.name in SEVERAL_REJECTED_TYPES else f for f in fields if f.name not in LD_COLUMNS]
    return pa.schema(fields, metadata=metadata)
