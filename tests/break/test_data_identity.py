"""Break: the cache identity's `data` field hashes what `datasets.load_dataset` returns, and datasets
serves a local file from its own Arrow cache keyed by the file's path and mtime only. A data file
rewritten with other rows but the same mtime (build systems and archives normalise mtimes: Nix's
store has mtime 1, `touch -d`, `tar`/`rsync -a`/`cp -p` keep the source's) is read as the old rows.

README (Identity): "the content of the input columns the run reads" is part of the identity;
"different inputs into the same `--out` are refused with the fields that differ".
"""

import json
import os

import pyarrow.parquet as pq

from tiny_models import run_cli, write_jsonl

MTIME_NS = 1_000_000_000  # 1970-01-01 00:00:01, the Nix store's mtime


def _rows(answer: str) -> list[dict]:
    return [{"prompt": f"Question {i}: what is the answer?", "chosen": f" {answer} {i}.", "rejected": f" no {i}."}
            for i in range(4)]


def _cached_chosen(cache) -> list[list[int]]:
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = []
    for shard in manifest["splits"]["train"]["shards"]:
        rows += pq.read_table(cache / shard["path"]).to_pylist()
    return [r["chosen_ids"] for r in sorted(rows, key=lambda r: r["index"])]


def _rewrite(data, answer):
    write_jsonl(data, _rows(answer))
    os.utime(data, ns=(MTIME_NS, MTIME_NS))


def test_a_file_rewritten_with_the_same_mtime_is_cached_as_its_new_rows(tiny_model_dir, tmp_path):
    from mlx_dpo.models import load_tokenizer

    data = tmp_path / "prefs.jsonl"
    _rewrite(data, "yes")
    run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "a", "--max-length", "64")
    _rewrite(data, "absolutely certainly")  # other answers, another size, the same mtime
    run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "b", "--max-length", "64",
            "--no-reuse")
    tokenizer = load_tokenizer(tiny_model_dir)
    cached = tokenizer.decode(_cached_chosen(tmp_path / "b")[0])
    assert "absolutely" in cached, f"cache b, made from the new file, holds the old file's answer {cached!r}"


def test_a_file_rewritten_with_the_same_mtime_is_not_served_from_the_old_cache(tiny_model_dir, tmp_path):
    data = tmp_path / "prefs.jsonl"
    _rewrite(data, "yes")
    run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "a", "--max-length", "64")
    _rewrite(data, "absolutely certainly")
    same = run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "a",
                   "--max-length", "64", ok=False)
    assert "Reusing cache" not in same.output, same.output
