"""precompute end to end on the tiny model: accounting, cache reuse, identity, resume, bad input."""

import json
import math
import shutil

import pyarrow.parquet as pq
import pytest

import tiny_models

run = tiny_models.invoke_cli


def read_rows(cache, split="train"):
    table = pq.read_table(sorted((cache / split).glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["index"])


@pytest.fixture
def cache(standard_cache):
    return standard_cache


def test_every_row_is_cached_or_rejected(cache, standard_data):
    n_input = sum(1 for _ in open(standard_data))
    manifest = json.loads((cache / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    rejects = [json.loads(line) for line in open(cache / "rejects.jsonl")]
    rows = read_rows(cache)
    assert train["rows_in"] == n_input == train["rows_cached"] + train["rows_rejected"]
    assert train["rows_rejected"] > 0  # max_length 22 makes some prompts fill the window
    assert sorted([r["index"] for r in rows] + [r["index"] for r in rejects]) == list(range(n_input))
    assert all(r["reason"].startswith("prompt fills max_length") for r in rejects)
    assert all(math.isfinite(r["ref_chosen_logps"]) and r["ref_chosen_logps"] < 0 for r in rows)
    assert len(train["shards"]) == 3 and sum(s["rows"] for s in train["shards"]) == len(rows)


def test_rerun_reuses_the_cache(cache, tiny_model_dir, standard_data):
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.parquet")}
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", cache,
                 "--max-length", 22, "--rows-per-shard", 5)
    assert result.exit_code == 0 and "Reusing cache" in result.output
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.parquet")} == before


def test_other_options_refuse_to_mix(cache, tiny_model_dir, standard_data):
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", cache,
                 "--max-length", 64, "--rows-per-shard", 5)
    assert result.exit_code == 1
    assert "options.max_length differs: cache 22, this run 64" in result.output


def test_interrupted_run_resumes_to_the_same_cache(cache, tiny_model_dir, standard_data, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(cache, partial)
    (partial / "manifest.json").unlink()  # as if killed before the end...
    (partial / "train" / "part-00002.parquet").unlink()  # ...and before the last shard
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", partial,
                 "--max-length", 22, "--rows-per-shard", 5)
    assert result.exit_code == 0, result.output
    assert read_rows(partial) == read_rows(cache)
    assert json.loads((partial / "manifest.json").read_text())["identity"] == json.loads(
        (cache / "manifest.json").read_text())["identity"]


@pytest.mark.parametrize("make_args, expected", [
    (lambda m, d, t: ["--model", m, "--data", t / "nope.jsonl"], "nope.jsonl: no such file or directory"),
    (lambda m, d, t: ["--model", t / "no-model", "--data", d], "no-model"),
    (lambda m, d, t: ["--model", m, "--data", _write(t / "bad.jsonl", '{"prompt": "a", "chosen": "b"}\n')],
     "missing column 'rejected'"),
    (lambda m, d, t: ["--model", t, "--data", d], "not a model directory (no config.json)"),
])
def test_bad_input_is_one_clear_line(tiny_model_dir, standard_data, tmp_path, make_args, expected):
    args = make_args(tiny_model_dir, standard_data, tmp_path)
    result = run("precompute", *args, "--out", tmp_path / "out")
    assert result.exit_code != 0
    assert expected in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def _write(path, text):
    path.write_text(text)
    return path
