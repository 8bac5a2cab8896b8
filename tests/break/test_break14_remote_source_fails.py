"""Break of issue 14 item 1 with an s3:// --reuse-from source that is missing or damaged.

Stated (README "Change the data without paying twice"): sources are the caches beside --out plus
`--reuse-from CACHE` ("a directory or s3://..."); "Each source is fully checked first, as `cache verify`
does (sha256 of every shard, ...); one that fails, or was made with another reference, is named and not
used." A local --reuse-from without a cache is named ("not reused: not a complete mlx-dpo cache") and
precompute goes on.

What happens: the same sources given as s3:// URLs stop the whole precompute (exit 1, no cache written):
a missing one with "s3://.../caches/nothing: not a complete mlx-dpo cache (no manifest.json; run
`mlx-dpo precompute --out ...`)", a damaged shard with "...part-00001.parquet: sha256 differs from the
manifest (the object was changed or corrupted)". Reuse is an optimisation: a bad source should cost the
rows it would have given, not the run.
"""

import pytest

import tiny_models
from test_remote import BUCKET, copy_cache, endpoint, forget_local, s3, uploaded  # noqa: F401 (fixtures)


def damaged(fs) -> str:
    url = copy_cache(fs, "damaged")
    shard = f"{BUCKET}/caches/damaged/train/part-00001.parquet"
    with fs.open_input_stream(shard) as stream:
        data = stream.read()
    with fs.open_output_stream(shard) as stream:
        stream.write(bytes(255 - b for b in data))  # same size: only the sha256 tells
    return url


@pytest.mark.parametrize("source", ["missing", "damaged"])
def test_a_failing_remote_source_is_named_and_not_used(s3, uploaded, tiny_model_dir, standard_data, tmp_path, source):
    url = f"s3://{BUCKET}/caches/nothing" if source == "missing" else damaged(s3)
    forget_local()
    local = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", standard_data,
                                   "--out", tmp_path / "a" / "c", "--reuse-from", tmp_path / "no-such-cache")
    assert local.exit_code == 0 and "not reused" in local.output, local.output  # the local counterpart
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", standard_data,
                                    "--out", tmp_path / "b" / "c", "--reuse-from", url)
    assert result.exit_code == 0, result.output
    assert f"{url}: not reused" in result.output and (tmp_path / "b" / "c" / "manifest.json").is_file()
