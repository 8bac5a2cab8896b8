"""Row-level reuse (issue 14 item 1): precompute takes the reference values of rows another cache of the
same reference already scored, matched by token ids; only new rows run through the model. Every check
goes through the CLI, against a fresh `--no-reuse` precompute of the same inputs as the oracle."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

import tiny_models

NEW_ROWS = [
    {"prompt": "Name a colour:", "chosen": " blue.", "rejected": " seven."},
    {"prompt": "Two and three make", "chosen": " five.", "rejected": " a tree."},
    {"prompt": "Say hello.", "chosen": " Hello!", "rejected": " No."},
]
VALUE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_tail_logps", "ref_rejected_tail_logps")


run = tiny_models.invoke_cli


def precompute(model, data, out, *extra):
    result = run("precompute", "--model", model, "--data", data, "--out", out, "--max-length", 22,
                 "--rows-per-shard", 5, *extra)
    assert result.exit_code == 0, result.output
    return result.output


def rows_of(cache, split="train"):
    table = pq.read_table(sorted((cache / split).glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["index"])


def manifest_of(cache):
    return json.loads((cache / "manifest.json").read_text())


@pytest.fixture
def v1(standard_cache, tmp_path):
    """The standard cache, as caches/v1 beside the caches the tests write."""
    target = tmp_path / "caches" / "v1"
    shutil.copytree(standard_cache, target)
    return target


def assert_like_fresh(cache, model, data, tmp_path, *extra):
    """Same identity as a fresh precompute of the same inputs (built in a folder of its own, without
    reuse), the same rows and token ids, the same values bit for bit (a sequence's values do not depend
    on its batchmates: test_batch_invariance.py); `cache verify` passes."""
    fresh = tmp_path / "fresh" / cache.name
    precompute(model, data, fresh, "--no-reuse", *extra)
    assert manifest_of(cache)["identity"] == manifest_of(fresh)["identity"]
    for split in manifest_of(fresh)["splits"]:
        ours, theirs = rows_of(cache, split), rows_of(fresh, split)
        assert [(r["index"], r["chosen_ids"], r["rejected_ids"]) for r in ours] == \
            [(r["index"], r["chosen_ids"], r["rejected_ids"]) for r in theirs]
        for a, b in zip(ours, theirs):
            assert (a["n_chosen_tokens"], a["n_rejected_tokens"]) == (b["n_chosen_tokens"], b["n_rejected_tokens"])
            for column in [c for c in VALUE_COLUMNS if c in b]:  # K > 1: no LD-DPO tails, K values each
                assert a[column] == b[column], (split, a["index"], column, a[column], b[column])
    verified = run("cache", "verify", cache)
    assert verified.exit_code == 0, verified.output


def by_ids(rows):
    return {json.dumps([r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]): r for r in rows}


def test_appended_rows_compute_only_the_new_ones(v1, tiny_model_dir, tmp_path):
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + NEW_ROWS)
    out = tmp_path / "caches" / "v2"
    output = precompute(tiny_model_dir, data, out)
    cached = manifest_of(v1)["splits"]["train"]["rows_cached"]
    rejected = manifest_of(v1)["splits"]["train"]["rows_rejected"]
    assert f"train: {12 + 3} rows: {cached} reused from {v1}, 3 computed, {rejected} rejected" in output
    # the reused values are the source's, bit for bit
    source = by_ids(rows_of(v1))
    reused = [r for r in rows_of(out) if json.dumps([r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]) in source]
    assert len(reused) == cached
    for row in reused:
        old = source[json.dumps([row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]])]
        assert all(row[c] == old[c] for c in VALUE_COLUMNS)
    assert_like_fresh(out, tiny_model_dir, data, tmp_path)
    shutil.rmtree(v1)  # standalone: the source is not needed any more
    assert run("cache", "verify", out).exit_code == 0


def test_a_filtered_subset_and_a_reordered_file_compute_nothing(v1, tiny_model_dir, tmp_path):
    rows = tiny_models.standard_rows()
    for name, subset in [("subset", rows[::2]), ("reordered", rows[::-1]), ("first-shard-only", rows[:3])]:
        data = tiny_models.write_jsonl(tmp_path / f"{name}.jsonl", subset)
        out = tmp_path / "caches" / name
        output = precompute(tiny_model_dir, data, out)
        assert f"train: {len(subset)} rows: " in output and "reused from" in output and ", 0 computed" in output
        assert_like_fresh(out, tiny_model_dir, data, tmp_path)


def test_a_new_validation_split_is_computed(v1, tiny_model_dir, tmp_path):
    folder = tmp_path / "data"
    tiny_models.write_jsonl(folder / "train.jsonl", tiny_models.standard_rows())
    tiny_models.write_jsonl(folder / "valid.jsonl", NEW_ROWS)
    out = tmp_path / "caches" / "with-valid"
    output = precompute(tiny_model_dir, folder, out)
    cached = manifest_of(v1)["splits"]["train"]["rows_cached"]
    assert f"train: 12 rows: {cached} reused from {v1}, 0 computed" in output
    assert "valid: 3 rows: 3 computed" in output
    assert_like_fresh(out, tiny_model_dir, folder, tmp_path)


@pytest.fixture(scope="module")
def other_model(tiny_model_dir, tmp_path_factory):
    """Other weights, the same tokenizer: the same token ids, other reference values."""
    directory = tmp_path_factory.mktemp("other-llama")
    tiny_models.build_llama(directory, tokenizer_dir=tiny_model_dir, seed=1)
    return directory


def test_a_cache_of_another_reference_is_not_used(v1, other_model, tiny_model_dir, standard_data, tmp_path):
    out = tmp_path / "caches" / "other"
    output = precompute(other_model, standard_data, out, "--reuse-from", v1)
    assert f"{v1}: not reused: another reference (reference_weights differs" in output
    assert "reused from" not in output and "cached" in output
    assert_like_fresh(out, other_model, standard_data, tmp_path)


def test_no_reuse_computes_everything(v1, tiny_model_dir, standard_data, tmp_path):
    output = precompute(tiny_model_dir, standard_data, tmp_path / "caches" / "again", "--no-reuse")
    assert "reused" not in output and "train: 12 rows:" in output


def test_a_source_failing_verification_is_not_used(v1, tiny_model_dir, standard_data, tmp_path):
    shard = sorted((v1 / "train").glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    shard.write_bytes(bytes(data))
    out = tmp_path / "caches" / "v2"
    output = precompute(tiny_model_dir, standard_data, out)
    assert f"{v1}: not reused: fails verification ({shard}" in output
    assert "reused from" not in output
    assert_like_fresh(out, tiny_model_dir, standard_data, tmp_path)


def test_reuse_from_a_cache_elsewhere(standard_cache, tiny_model_dir, tmp_path):
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", NEW_ROWS + tiny_models.standard_rows())
    out = tmp_path / "alone" / "c"
    output = precompute(tiny_model_dir, data, out, "--reuse-from", standard_cache)
    cached = manifest_of(standard_cache)["splits"]["train"]["rows_cached"]
    assert f"{cached} reused from {standard_cache}, 3 computed" in output


def test_rows_with_several_rejected_answers_match_by_all_their_lists(tiny_model_dir, tmp_path):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": [r["rejected"], " no."]} for r in NEW_ROWS]
    first = tiny_models.write_jsonl(tmp_path / "k2.jsonl", rows[:2])
    precompute(tiny_model_dir, first, tmp_path / "caches" / "k1")
    changed = {**rows[1], "rejected": [rows[1]["rejected"][0], " maybe."]}  # one of its K answers differs
    data = tiny_models.write_jsonl(tmp_path / "k2-more.jsonl", [rows[2], rows[0], changed])
    output = precompute(tiny_model_dir, data, tmp_path / "caches" / "k2")
    assert f"train: 3 rows: 1 reused from {tmp_path / 'caches' / 'k1'}, 2 computed" in output
    assert_like_fresh(tmp_path / "caches" / "k2", tiny_model_dir, data, tmp_path)


def test_overwrite_in_place_reuses_the_old_cache(v1, tiny_model_dir, tmp_path):
    """`precompute --out SAME --overwrite` (the natural rebuild): the old cache at --out is read and
    verified as a source, so only the new rows run through the model (test_overwrite.py: it stays whole
    until the new cache replaces it)."""
    cached = manifest_of(v1)["splits"]["train"]["rows_cached"]
    data = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + NEW_ROWS)
    output = precompute(tiny_model_dir, data, v1, "--overwrite")
    assert f"{cached} reused from {v1}, 3 computed" in output, output
    assert manifest_of(v1)["splits"]["train"]["rows_cached"] == cached + 3
    assert_like_fresh(v1, tiny_model_dir, data, tmp_path)
