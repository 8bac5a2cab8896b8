"""precompute under crashes and concurrency: kill -9 mid-run then rerun gives the same cache, row
for row; a partial cache is never taken for a complete one; one writer per cache at a time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.pipeline.lock import LOCK_NAME, cache_lock

run = tiny_models.invoke_cli


def cache_rows(cache):
    """Every split's rows, by index, and the rejects: what a cache holds, whatever its shard timing."""
    splits = {}
    for split_dir in sorted(p for p in cache.iterdir() if p.is_dir()):
        table = pq.read_table(sorted(split_dir.glob("part-*.parquet")))
        splits[split_dir.name] = sorted(table.to_pylist(), key=lambda r: r["index"])
    return splits, (cache / "rejects.jsonl").read_text()


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory):
    rows = [{**r, "prompt": f"{i} {r['prompt']}"} for i in range(20) for r in tiny_models.standard_rows()]
    return tiny_models.write_jsonl(tmp_path_factory.mktemp("many") / "many.jsonl", rows)


def precompute_args(model, data, out):
    return ["precompute", "--model", model, "--data", data, "--out", out, "--max-length", 24,
            "--rows-per-shard", 8, "--tokens-per-batch", 256]


def test_kill_9_mid_run_then_rerun_gives_the_same_cache(tiny_model_dir, many_rows, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(*precompute_args(tiny_model_dir, many_rows, whole)).exit_code == 0

    process = subprocess.Popen([sys.executable, "-m", "mlx_dpo", *map(str, precompute_args(tiny_model_dir, many_rows, killed))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "train" / "part-00002.parquet").exists():  # two shards done, others to come
        assert process.poll() is None and time.monotonic() < deadline, "precompute ended before it could be killed"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before the kill: use more rows"
    done = sorted(killed.glob("train/part-*.parquet"))
    assert 3 <= len(done) + 1 < 30 and (killed / LOCK_NAME).exists()  # the dead writer's lock file stays

    # A partial cache is refused, not read.
    for args in (["cache", "verify", killed], ["train", "--cache", killed, "--model", tiny_model_dir, "--output", tmp_path / "r"]):
        result = run(*args)
        assert result.exit_code == 1 and "not a complete mlx-dpo cache (no manifest.json" in result.output

    before = {p: p.stat().st_mtime_ns for p in done}
    result = run(*precompute_args(tiny_model_dir, many_rows, killed))
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in done} == before  # resumed: complete shards were not redone
    assert cache_rows(killed) == cache_rows(whole)
    manifests = [json.loads((c / "manifest.json").read_text()) for c in (whole, killed)]
    for m in manifests:
        m.pop("created_at")
    assert manifests[0] == manifests[1]
    assert not (killed / LOCK_NAME).exists() and not list(killed.rglob(".*.tmp*"))


def test_a_second_writer_is_told_who_holds_the_cache(tiny_model_dir, standard_data, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    with cache_lock(out):
        result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out)
    assert result.exit_code == 1
    assert (f"{out}: another mlx-dpo precompute is writing this cache (pid {os.getpid()} on {socket.gethostname()}, "
            "since ") in result.output
    assert not (out / "manifest.json").exists()
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out)
    assert result.exit_code == 0, result.output  # released on exit


def test_a_lock_left_by_a_dead_process_does_not_block(tiny_model_dir, standard_data, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then"}))
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out)
    assert result.exit_code == 0, result.output
    assert not (out / LOCK_NAME).exists()
