"""Manifest round trip, identity hashing and the mismatch message."""

import pyarrow as pa
import pyarrow.parquet as pq

from mlx_dpo.schemas import (
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    describe_difference,
    identity_hash,
    read_manifest,
    ref_logps_schema,
    write_json_atomic,
)
from mlx_dpo.schemas.manifest import MANIFEST_NAME

FIELDS = {"schema_version": SCHEMA_VERSION, "reference_weights": "a" * 64, "dtype": "float32", "tokenizer": "b" * 64,
          "tokenization_rules": 1, "data": {"train": "c" * 64},
          "options": {"max_length": 512, "truncation_mode": "keep_start"}}


def test_identity_changes_with_any_field():
    base = identity_hash(FIELDS)
    assert identity_hash(dict(FIELDS)) == base
    for changed in ({"tokenizer": "d" * 64}, {"options": {**FIELDS["options"], "max_length": 256}},
                    {"data": {"train": "e" * 64}}, {"schema_version": SCHEMA_VERSION + 1}):
        assert identity_hash({**FIELDS, **changed}) != base


def test_difference_names_the_field():
    other = {**FIELDS, "tokenizer": "d" * 64, "options": {**FIELDS["options"], "max_length": 256}}
    message = describe_difference(FIELDS, other, "model")
    assert "tokenizer differs: cache bbbbbbbbbbbb…, model dddddddddddd…" in message
    assert "options.max_length differs: cache 512, model 256" in message
    assert describe_difference(FIELDS, FIELDS) == ""


def test_manifest_round_trip(tmp_path):
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, identity=identity_hash(FIELDS), identity_fields=FIELDS, reference_model="m",
        max_length=512, truncation_mode="keep_start",
        splits={"train": SplitInfo(3, 2, 1, {"empty chosen": 1}, 10, [ShardInfo("train/part-00000.parquet", 2, 99, "f" * 64)])},
    )
    write_json_atomic(tmp_path / MANIFEST_NAME, manifest.to_json())
    assert read_manifest(tmp_path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]  # no temp file left behind


def test_schema_metadata_round_trip(tmp_path):
    schema = ref_logps_schema("abc", FIELDS)
    pq.write_table(pa.Table.from_pylist([], schema=schema), tmp_path / "x.parquet")
    metadata = pq.read_schema(tmp_path / "x.parquet").metadata
    assert metadata[b"mlx_dpo.identity"] == b"abc"
    assert b"reference_weights" in metadata[b"mlx_dpo.identity_fields"]


def test_missing_manifest_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a complete mlx-dpo cache"):
        read_manifest(tmp_path)
