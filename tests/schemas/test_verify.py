"""`mlx-dpo cache verify`: a whole cache passes; each kind of damage is named, file and row."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.schemas.verify import file_sha256

run = tiny_models.invoke_cli


@pytest.fixture
def good(standard_cache):
    return standard_cache


@pytest.fixture
def cache(good, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(good, copy)
    return copy


def edit_manifest(cache, change):
    manifest = json.loads((cache / "manifest.json").read_text())
    change(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def rewrite_shard(cache, change):
    """Replace shard 0 with `change(table)` and record its new size and sha256, as a forger would."""
    path = cache / "train" / "part-00000.parquet"
    table = pq.read_table(path)
    pq.write_table(change(table), path)

    def fix(manifest):
        shard = manifest["splits"]["train"]["shards"][0]
        shard.update(bytes=path.stat().st_size, sha256=file_sha256(path))
    edit_manifest(cache, fix)
    return path


def test_a_whole_cache_passes(good):
    result = run("cache", "verify", good)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{good}: OK (") and "sha256" in result.output


def test_a_flipped_byte_is_caught_by_the_full_check_only(cache):
    path = cache / "train" / "part-00001.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    path.write_bytes(bytes(data))
    assert run("cache", "verify", "--quick", cache).exit_code == 0
    result = run("cache", "verify", cache)
    assert result.exit_code == 1
    assert f"{path}: sha256 differs from the manifest" in result.output


def test_a_truncated_shard_is_caught_by_the_cheap_check(cache):
    path = cache / "train" / "part-00002.parquet"
    path.write_bytes(path.read_bytes()[:100])
    result = run("cache", "verify", "--quick", cache)
    assert result.exit_code == 1 and f"{path}: 100 bytes, manifest says" in result.output


def test_a_non_finite_reference_log_prob_is_named_with_its_row(cache):
    def poison(table):
        values = table["ref_chosen_logps"].to_pylist()
        values[1] = float("nan")
        column = table.schema.get_field_index("ref_chosen_logps")
        return table.set_column(column, table.schema.field(column), pa.array(values, pa.float32()))
    path = rewrite_shard(cache, poison)
    row = pq.read_table(path)["index"][1].as_py()
    result = run("cache", "verify", cache)
    assert result.exit_code == 1 and f"{path}: row {row}: ref_chosen_logps is not finite" in result.output


def test_a_changed_schema_is_refused(cache):
    path = rewrite_shard(cache, lambda t: t.drop_columns(["n_rejected_tokens"]))
    result = run("cache", "verify", cache)
    assert result.exit_code == 1 and f"{path}: schema differs" in result.output


def test_lost_rows_break_the_accounting(cache):
    rejects = cache / "rejects.jsonl"
    rejects.write_text("".join(rejects.read_text().splitlines(keepends=True)[1:]))
    result = run("cache", "verify", cache)
    assert result.exit_code == 1 and "do not cover input rows 0..11 exactly once" in result.output


def test_a_manifest_cannot_point_outside_the_cache(cache):
    edit_manifest(cache, lambda m: m["splits"]["train"]["shards"][0].update(path="../../etc/passwd"))
    result = run("cache", "verify", "--quick", cache)
    assert result.exit_code == 1 and "'../../etc/passwd' points outside the cache" in result.output


def test_a_directory_that_is_not_a_cache(tmp_path):
    result = run("cache", "verify", tmp_path)
    assert result.exit_code == 1 and "not a complete mlx-dpo cache (no manifest.json" in result.output
    for text in ("{not json", '{"splits": []}', "[]"):
        (tmp_path / "manifest.json").write_text(text)
        result = run("cache", "verify", tmp_path)
        assert result.exit_code == 1 and "unreadable manifest" in result.output, text


def test_manifest_paths_are_relative_and_links_are_refused(good, cache, tmp_path):
    manifest = json.loads((good / "manifest.json").read_text())
    paths = [s["path"] for split in manifest["splits"].values() for s in split["shards"]] + [manifest["rejects_file"]]
    assert paths and all(not p.startswith("/") and ".." not in p for p in paths)

    outside = tmp_path / "elsewhere"
    (cache / "train").rename(outside)
    (cache / "train").symlink_to(outside)
    result = run("cache", "verify", "--quick", cache)
    assert result.exit_code == 1 and "'train/part-00000.parquet' goes through a symbolic link" in result.output


# ---- issue 10: the new invariants, and readers that stay inside the cache

def test_an_identity_that_is_not_the_hash_of_its_fields_is_caught(cache):
    edit_manifest(cache, lambda m: m["identity_fields"].update(dtype="bfloat16"))  # claims another precision
    result = run("cache", "verify", cache)
    assert result.exit_code == 1 and "is not the hash of its identity_fields" in result.output


def test_identity_fields_must_name_the_dtype(cache):
    from mlx_dpo.schemas import identity_hash

    def drop_dtype(manifest):
        manifest["identity_fields"].pop("dtype")
        manifest["identity"] = identity_hash(manifest["identity_fields"])  # a consistent forgery
    edit_manifest(cache, drop_dtype)
    result = run("cache", "verify", cache)
    assert result.exit_code == 1 and "identity_fields lack dtype" in result.output


def test_a_row_both_cached_and_rejected_breaks_the_accounting(cache):
    cached = pq.read_table(cache / "train" / "part-00000.parquet")["index"][0].as_py()
    with open(cache / "rejects.jsonl", "a") as handle:
        handle.write(json.dumps({"split": "train", "index": cached, "reason": "empty chosen"}) + "\n")
    edit_manifest(cache, lambda m: m["splits"]["train"].update(rows_rejected=m["splits"]["train"]["rows_rejected"] + 1,
                                                               rows_in=m["splits"]["train"]["rows_in"] + 1))
    result = run("cache", "verify", cache)
    assert result.exit_code == 1 and f"row {cached} is there 2 times" in result.output


@pytest.mark.parametrize("command", [["cache", "inspect"], ["cache", "verify"], ["cache", "verify", "--quick"]])
def test_no_reader_follows_a_manifest_path_outside_the_cache(cache, tmp_path, command):
    secret = tmp_path / "x.jsonl"
    secret.write_text(json.dumps({"split": "train", "index": 0, "reason": "SECRET-CONTENT"}) + "\n")
    edit_manifest(cache, lambda m: m.update(rejects_file="../x.jsonl"))
    result = run(*command, cache)
    assert result.exit_code == 1 and "'../x.jsonl' points outside the cache" in result.output
    assert "SECRET" not in result.output


def test_inspect_refuses_a_rejects_file_behind_a_symbolic_link(cache, tmp_path):
    secret = tmp_path / "x.jsonl"
    secret.write_text(json.dumps({"split": "train", "index": 0, "reason": "SECRET-CONTENT"}) + "\n")
    (cache / "rejects.jsonl").unlink()
    (cache / "rejects.jsonl").symlink_to(secret)
    result = run("cache", "inspect", cache)
    assert result.exit_code == 1 and "'rejects.jsonl' goes through a symbolic link" in result.output
    assert "SECRET" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["verify", "inspect", "train"])
def test_readers_refuse_a_manifest_behind_a_symbolic_link(good, tiny_model_dir, tmp_path, command):
    """The one check precompute and merge run too: no symbolic link anywhere in the cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(good / "train", cache / "train")
    shutil.copy(good / "rejects.jsonl", cache / "rejects.jsonl")
    outside = tmp_path / "elsewhere" / "manifest.json"
    outside.parent.mkdir()
    shutil.copy(good / "manifest.json", outside)
    (cache / "manifest.json").symlink_to(outside)
    args = {"verify": ["cache", "verify", cache], "inspect": ["cache", "inspect", cache],
            "train": ["train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 1]}
    result = run(*args[command])
    assert result.exit_code == 1 and f"{cache / 'manifest.json'}: a symbolic link inside the cache" in result.output


def test_readers_refuse_a_link_the_manifest_does_not_name(cache):
    (cache / "train" / "part-00009.parquet").symlink_to(cache / "train" / "part-00000.parquet")
    result = run("cache", "verify", "--quick", cache)
    assert result.exit_code == 1 and "part-00009.parquet: a symbolic link inside the cache" in result.output


def test_merge_refuses_a_part_whose_split_folder_is_a_symbolic_link(tiny_model_dir, standard_data, tmp_path):
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i, part in enumerate(parts):
        result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", part,
                     "--rows-per-shard", 5, "--num-shards", 2, "--shard-index", i)
        assert result.exit_code == 0, result.output
    outside = tmp_path / "elsewhere"
    (parts[1] / "train").rename(outside)
    (parts[1] / "train").symlink_to(outside)
    result = run("cache", "merge", tmp_path / "merged", *parts)
    assert result.exit_code == 1 and f"{parts[1] / 'train'}: a symbolic link inside the cache" in result.output
    assert not (tmp_path / "merged" / "manifest.json").exists()


def test_train_names_a_manifest_without_a_dtype_and_says_re_run_precompute(cache, tiny_model_dir, tmp_path):
    from mlx_dpo.schemas import identity_hash

    def drop_dtype(manifest):
        manifest["identity_fields"].pop("dtype")
        manifest["identity"] = identity_hash(manifest["identity_fields"])
    edit_manifest(cache, drop_dtype)
    result = run("train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 1)
    assert result.exit_code == 1 and "KeyError" not in result.output, result.output
    assert f"{cache / 'manifest.json'}: identity_fields lack dtype" in result.output and "re-run precompute" in result.output


@pytest.mark.parametrize("replace, named", [(lambda p: (p.unlink(), p.mkdir()), "is a folder, not a Parquet file"),
                                            (lambda p: p.write_bytes(b"x" * p.stat().st_size), "not a readable Parquet file")])
def test_inspect_names_a_shard_that_is_not_a_parquet_file(cache, replace, named):
    shard = cache / "train" / "part-00000.parquet"
    replace(shard)
    result = run("cache", "inspect", cache)
    assert result.exit_code == 1 and f"{shard}: " in result.output and named in result.output, result.output
    assert "Traceback" not in result.output


def test_a_cache_of_an_older_schema_is_refused_with_re_run_precompute(cache, tiny_model_dir, standard_data, tmp_path):
    from mlx_dpo.schemas import SCHEMA_VERSION

    edit_manifest(cache, lambda m: m.update(schema_version=SCHEMA_VERSION - 1))
    for args in (["cache", "verify", cache], ["cache", "inspect", cache],
                 ["train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run"],
                 ["precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", cache]):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert f"schema version {SCHEMA_VERSION - 1}" in result.output and "re-run precompute" in result.output
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", cache,
                 "--max-length", 22, "--rows-per-shard", 5, "--overwrite")
    assert result.exit_code == 0, result.output
    assert run("cache", "verify", cache).exit_code == 0
