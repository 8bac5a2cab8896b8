"""Break of the bad-input rule for `report --pairs / --samples` (issue 14 items 3 and 4).

Stated (HELPER_RULES / project guide, README "When things go wrong"): bad input gives one clear line
naming the file, row and field, and a non-zero exit; `load_run` does it for metrics.jsonl
("metrics.jsonl:N: not a JSON line").

What happens (exit 1, but the line names no file, row or field):
- samples.jsonl whose last line is cut:  "Error: JSONDecodeError: Unterminated string starting at: line 1
  column 13 (char 12) (run with --debug for the traceback)"
- eval_pairs.parquet without its reward_margin column (another writer, an older layout):
  "Error: KeyError: 'reward_margin' (run with --debug for the traceback)"
"""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml



@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"cache": str(tmp_path / "no-cache"), "model": "m", "beta": 0.1}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "eval", "loss": 0.69}) + "\n")
    return run


def report(*args):
    """The console command as a user runs it (its one-line error handler is in mlx_dpo.cli.main)."""
    return subprocess.run([sys.executable, "-m", "mlx_dpo", "report", *map(str, args)], capture_output=True, text=True)


def assert_one_line_naming(result, name: str, detail: str):
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and detail in lines[0], result.stdout + result.stderr


def test_a_cut_samples_line_is_named(run_dir):
    good = {"step": 0, "index": 1, "prompt": "x", "completion": "y", "finish_reason": "stop"}
    (run_dir / "samples.jsonl").write_text(json.dumps(good) + "\n" + '{"step": 2, "ind')
    result = report(run_dir, "--samples")
    assert_one_line_naming(result, "samples.jsonl", ":2")  # the file and its line 2


def test_an_eval_pairs_file_without_a_column_is_named(run_dir):
    table = pa.table({"step": [0], "index": [0], "k": pa.array([0], pa.int32()),
                      "ref_margin": pa.array([1.0], pa.float32()), "policy_margin": pa.array([1.0], pa.float32())})
    pq.write_table(table, run_dir / "eval_pairs.parquet")
    result = report(run_dir, "--pairs")
    assert_one_line_naming(result, "eval_pairs.parquet", "reward_margin")
