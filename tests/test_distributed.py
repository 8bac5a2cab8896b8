"""Scale out: 2 ranks through `mlx.launch --backend ring` on localhost, and shard jobs + `cache merge`.
Each must give what one process gives."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tiny_models
from mlx_dpo.cli import cli

BIN = Path(sys.executable).parent
TRAIN_ARGS = ["--iters", "4", "--learning-rate", "1e-3", "--steps-per-report", "1", "--steps-per-eval", "2",
              "--lr-schedule", "constant"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def launch(*args):
    """`mlx.launch --backend ring -n 2 mlx-dpo ...`: two real ranks on localhost."""
    command = [str(BIN / "mlx.launch"), "--backend", "ring", "-n", "2", str(BIN / "mlx-dpo"), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def shards(cache: Path) -> dict[str, str]:
    manifest = json.loads((cache / "manifest.json").read_text())
    return {s["path"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    rows = tiny_models.standard_rows()  # 12 rows; 8 train + 4 valid, split into shards of 3
    (root / "data").mkdir()
    tiny_models.write_jsonl(root / "data" / "train.jsonl", rows[:8])
    tiny_models.write_jsonl(root / "data" / "valid.jsonl", rows[8:])
    args = ["--model", tiny_model_dir, "--data", root / "data", "--rows-per-shard", 3]
    assert run("precompute", *args, "--out", root / "single").exit_code == 0
    return root, args


def test_two_ranks_precompute_the_same_cache(setup):
    root, args = setup
    launch("precompute", *args, "--out", root / "ranks")
    assert shards(root / "ranks") == shards(root / "single")  # same files, byte for byte
    assert len(shards(root / "single")) == 5  # 3 train + 2 valid: both ranks had work


def test_shard_jobs_and_merge_give_the_same_cache(setup, tmp_path):
    root, args = setup
    for i in range(3):
        result = run("precompute", *args, "--out", tmp_path / f"part{i}", "--num-shards", 3, "--shard-index", i)
        assert result.exit_code == 0 and "cache merge" in result.output
        assert not (tmp_path / f"part{i}" / "manifest.json").exists()  # a part is never a complete cache
    result = run("cache", "merge", tmp_path / "merged", tmp_path / "part2", tmp_path / "part0", tmp_path / "part1")
    assert result.exit_code == 0, result.output
    assert shards(tmp_path / "merged") == shards(root / "single")
    assert run("cache", "verify", tmp_path / "merged").exit_code == 0

    missing = run("cache", "merge", tmp_path / "m2", tmp_path / "part0", tmp_path / "part1")
    assert missing.exit_code == 1 and "need shard indices 0..2 exactly once, got [0, 1]" in missing.output
    other = tmp_path / "other"
    assert run("precompute", *args[:-2], "--rows-per-shard", 3, "--max-length", 64, "--out", other,
               "--num-shards", 3, "--shard-index", 2).exit_code == 0
    mixed = run("cache", "merge", tmp_path / "m3", tmp_path / "part0", tmp_path / "part1", other)
    assert mixed.exit_code == 1 and "options.max_length differs" in mixed.output


def test_two_ranks_train_like_one_process_with_the_global_batch(setup, tiny_model_dir):
    root, _ = setup
    assert run("train", "--cache", root / "single", "--model", tiny_model_dir, "--output", root / "one",
               "--batch-size", 4, *TRAIN_ARGS).exit_code == 0
    output = launch("train", "--cache", root / "single", "--model", tiny_model_dir, "--output", root / "two",
                    "--batch-size", 2, *TRAIN_ARGS)
    assert "global batch 2 x 2 = 4 pairs" in output
    one, two = ([json.loads(line) for line in open(root / name / "metrics.jsonl")] for name in ("one", "two"))
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]  # rank 0 wrote once
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "logps/chosen", "ntoks"):
            # Same pairs, other batch shapes: equal up to float32 rounding of sums of ~100 terms.
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-4), (a["step"], a["split"], key)
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(p.name for p in (root / "one").iterdir())
    shutil.rmtree(root / "one")
