"""train --resume: a run stopped or killed at any step continues to the same losses, step for step,
as an uninterrupted run (weights, optimizer state, schedule, data position and RNG all restored)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

import tiny_models

# Not the run's but the process's: timing, and the shapes this process traced the compiled step for.
TIMING = ("tokens_per_sec", "peak_memory_gb", "compiled_shapes")
# 12 rows in global batches of 4 x 2 micro-batches: an epoch is a step of 8 pairs and one of 4, so
# resume points fall mid-epoch; dropout makes every step draw from the RNG; warmup + cosine make the schedule matter.
ARGS = ["--iters", 7, "--batch-size", 4, "--grad-accumulation-steps", 2, "--learning-rate", 1e-2,
        "--warmup-steps", 2, "--lora-dropout", 0.1, "--shuffle-buffer", 8, "--steps-per-report", 1,
        "--steps-per-eval", 3, "--steps-per-save", 2]


run = tiny_models.invoke_cli


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(root / "data" / "train.jsonl", rows)
    tiny_models.write_jsonl(root / "data" / "valid.jsonl", rows[:4])
    assert run("precompute", "--model", tiny_model_dir, "--data", root / "data", "--out", root / "cache").exit_code == 0
    whole = train(root, tiny_model_dir, "whole")
    assert whole.exit_code == 0, whole.output
    return root, tiny_model_dir


def train(root, model, out, *extra):
    return run("train", "--cache", root / "cache", "--model", model, "--output", root / out, *ARGS, *extra)


def metrics(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_same_run(run_dir, whole_dir):
    import mlx.core as mx

    assert metrics(run_dir) == metrics(whole_dir)  # every loss, reward, grad norm and learning rate, exactly
    ours, theirs = mx.load(str(run_dir / "adapters.safetensors")), mx.load(str(whole_dir / "adapters.safetensors"))
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in theirs)


def test_stopped_then_resumed_equals_uninterrupted(setup):
    root, model = setup
    stopped = train(root, model, "stopped", "--stop-after", 3)
    assert stopped.exit_code == 0, stopped.output
    assert "Stopped after step 3 of 7" in stopped.output
    assert max(r["step"] for r in metrics(root / "stopped")) == 3
    resumed = train(root, model, "stopped", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming" in resumed.output and "after step 3 of 7 (epoch 1, batch 1)" in resumed.output
    assert_same_run(root / "stopped", root / "whole")
    again = train(root, model, "stopped", "--resume")
    assert again.exit_code == 0 and "already complete (7 of 7 steps)" in again.output


def test_killed_mid_run_then_resumed_equals_uninterrupted(setup):
    """kill -9 at whatever step the run has reached once its first checkpoint exists; the metrics it
    wrote past that checkpoint are dropped and written again, identically."""
    root, model = setup
    run_dir = root / "killed"
    command = [sys.executable, "-m", "mlx_dpo", "train", "--cache", root / "cache", "--model", model,
               "--output", run_dir, *ARGS]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "0000002").exists():
        assert process.poll() is None and time.monotonic() < deadline, "train ended before it could be killed"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with open(run_dir / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write('{"step": 9, "split": "tr')  # as if killed in the middle of a line
    resumed = train(root, model, "killed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_run(run_dir, root / "whole")


@pytest.mark.parametrize("extra, message", [
    (["--resume", "--beta", 0.2], "cannot resume with other options (beta: run 0.1, now 0.2)"),
    # val_batches picks the evaluated pairs: another value mid-run would compare other pairs (Held-out: A -> B)
    (["--resume", "--val-batches", 1], "cannot resume with other options (val_batches: run None, now 1)"),
    (["--resume", "--output-is-new"], "no checkpoint to resume from"),
    ([], "already holds a run (metrics.jsonl); use another --output, --resume or --overwrite"),
])
def test_resume_refusals(setup, extra, message):
    root, model = setup
    out = "new-run" if "--output-is-new" in extra else "whole"
    result = train(root, model, out, *[e for e in extra if e != "--output-is-new"])
    assert result.exit_code == 1 and message in result.output, result.output


def test_overwrite_forgets_the_old_checkpoints(setup):
    root, model = setup
    shutil.copytree(root / "whole", root / "redo")
    result = train(root, model, "redo", "--overwrite", "--iters", 3)
    assert result.exit_code == 0, result.output
    assert [p.name for p in (root / "redo" / "checkpoints").iterdir()] == ["0000003"]


def test_train_checks_the_cache(setup, tmp_path):
    """Sizes, row counts and paths always; sha256, schema and values with --verify-cache."""
    root, model = setup
    cache = tmp_path / "cache"
    shutil.copytree(root / "cache", cache)
    shard = cache / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    args = ["train", "--cache", cache, "--model", model, "--output", tmp_path / "run", "--iters", 1]
    result = run(*args, "--verify-cache")
    assert result.exit_code == 1 and f"{shard}: sha256 differs from the manifest" in result.output

    shard.write_bytes(bytes(data[:-10]))
    result = run(*args)
    assert result.exit_code == 1 and f"{shard}: {len(data) - 10} bytes, manifest says {len(data)}" in result.output

    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["path"] = "/etc/hostname"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = run(*args)
    assert result.exit_code == 1 and "'/etc/hostname' points outside the cache" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was written
