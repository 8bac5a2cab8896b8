"""`mlx-dpo report RUN --pairs / --samples` on hand-written run directories with a hand-built cache whose
token ids are the tiny tokenizer's encoding of known texts."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

import tiny_models
from mlx_dpo.cli import cli
from mlx_dpo.cli.report import load_run
from mlx_dpo.cli.report_pairs import plot_pairs, shorten
from mlx_dpo.schemas import SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo, write_json_atomic

TOKENS = pa.list_(pa.int32())
# Last evaluation (step 20): index -> (reference margin, policy margin).
#   before right (ref > 0): 1, 2, 5 = 3 of 6; now right (policy > 0): 0, 1, 4, 5 = 4 of 6
#   flipped to chosen: 0, 4; to rejected: 2; unchanged: 1, 5 right, 3 wrong
#   change: +3, +0.2, -2, +0.1, +5, -0.1 -> most improved 4, 0; most worsened 2, 5
MARGINS = {0: (-1.0, 2.0), 1: (0.5, 0.7), 2: (1.0, -1.0), 3: (-0.5, -0.4), 4: (-2.0, 3.0), 5: (0.2, 0.1)}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cache = tmp_path / "cache"
    (cache / "valid").mkdir(parents=True)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    rows = [{"index": i, "prompt_ids": encode(f"Question number {i}?"), "chosen_ids": encode(f"Good answer {i}."),
             "rejected_ids": encode(f"Bad answer {i}.")} for i in MARGINS]
    part = cache / "valid" / "part-00000.parquet"
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}, schema=pa.schema(
        [("index", pa.int64()), ("prompt_ids", TOKENS), ("chosen_ids", TOKENS), ("rejected_ids", TOKENS)])), part)
    split = SplitInfo(rows_in=6, rows_cached=6, rows_rejected=0, rejected_by_reason={}, completion_tokens=0,
                      shards=[ShardInfo("valid/part-00000.parquet", 6, part.stat().st_size, "-")])
    manifest = Manifest(schema_version=SCHEMA_VERSION, identity="ab" * 32, identity_fields=tiny_models.identity_fields(), reference_model="m", max_length=64,
                        truncation_mode="keep_start", splits={"valid": split}, rejects_file="rejects.jsonl")
    write_json_atomic(cache / "manifest.json", manifest.to_json())

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"cache": str(cache), "model": str(tiny_model_dir), "beta": 0.1}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "eval", "loss": 0.69}) + "\n")
    index = list(MARGINS)
    ref = np.array([MARGINS[i][0] for i in index], np.float32)
    now = np.array([MARGINS[i][1] for i in index], np.float32)
    table = {"step": [0] * 6 + [20] * 6, "index": index * 2, "k": [0] * 12, "ref_margin": np.r_[ref, ref],
             "policy_margin": np.r_[ref, now], "reward_margin": np.r_[ref * 0, 0.1 * (now - ref)]}
    pq.write_table(pa.table(table), run / "eval_pairs.parquet")
    samples = [{"step": step, "index": i, "prompt": f"Question number {i}?", "completion": f"answer at step {step}",
                "finish_reason": "stop"} for step in (0, 10, 20) for i in (1, 3)]
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


def test_pairs_counts_flips_and_extremes(run_dir):
    result = invoke("report", run_dir, "--pairs", "--top", 2)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "run: 6 held-out pairs, evaluated at steps [0, 20]"
    assert lines[1] == "  prefers chosen (margin > 0): before (reference) 3 of 6 (50.0%)  ->  step 20: 4 (66.7%)"
    assert lines[2] == "  flipped to chosen 2, flipped to rejected 1; unchanged: 2 right, 1 wrong"
    assert lines[3] == "  moved towards chosen (reward margin > 0, as rewards/accuracies counts): 4 (66.7%)"
    improved, worsened = lines.index("  most improved (policy margin - reference margin, nats):"), \
        lines.index("  most worsened (policy margin - reference margin, nats):")
    assert lines[improved + 1].split() == ["+5.000", "index", "4:", "margin", "-2.000", "->", "+3.000"]
    assert lines[improved + 2].split() == ["prompt", "Question", "number", "4?"]
    assert lines[improved + 3].split() == ["chosen", "Good", "answer", "4."]
    assert lines[improved + 4].split() == ["rejected", "Bad", "answer", "4."]
    assert lines[improved + 5].split()[:3] == ["+3.000", "index", "0:"]
    assert lines[worsened + 1].split()[:3] == ["-2.000", "index", "2:"]
    assert lines[worsened + 5].split()[:3] == ["-0.100", "index", "5:"]
    assert "answers not shown" not in result.output


def test_when_no_pair_worsened_the_least_improved_are_shown(run_dir):
    table = pq.read_table(run_dir / "eval_pairs.parquet").to_pydict()
    table["policy_margin"] = [m + 10 for m in table["policy_margin"]]
    pq.write_table(pa.table(table), run_dir / "eval_pairs.parquet")
    result = invoke("report", run_dir, "--pairs")
    assert "most worsened" not in result.output
    assert "  least improved (none worsened) (policy margin - reference margin, nats):" in result.output


def test_long_answers_are_cut_to_four_lines(run_dir):
    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    samples[0]["completion"] = "word " * 200
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    block = invoke("report", run_dir, "--samples").output.split("index 1")[1].split("index 3")[0].splitlines()
    left = [line.split("|")[0].strip() for line in block[1:]]
    assert left[0] == "step 0" and left[5] == "chosen"  # 4 lines of answer between the titles
    assert all(line.startswith("word word") for line in left[1:5]) and left[4].endswith("…")


def test_pairs_without_the_cache_still_count(run_dir, tmp_path):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "cache": str(tmp_path / "gone")}))
    result = invoke("report", run_dir, "--pairs")
    assert result.exit_code == 0, result.output
    assert "flipped to chosen 2, flipped to rejected 1" in result.output
    assert f"(answers not shown: cache {tmp_path / 'gone'} unreadable" in result.output


def test_pairs_plot_has_the_scatter_and_the_histogram(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pairs.png"
    result = invoke("report", run_dir, "--pairs", "--out", out)
    assert result.exit_code == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = plot_pairs([load_run(run_dir)], ["run"], str(tmp_path / "again.png"))
    scatter, hist = figure.axes
    np.testing.assert_allclose(scatter.collections[0].get_offsets(), [MARGINS[i] for i in MARGINS])
    colours = scatter.collections[0].get_facecolors()[:, :3].round(3).tolist()
    green, red = [0.173, 0.627, 0.173], [0.839, 0.153, 0.157]  # tab:green, tab:red
    assert [c == green for c in colours] == [True, False, False, False, True, False]  # flipped to chosen: 0, 4
    assert [c == red for c in colours] == [False, False, True, False, False, False]  # flipped to rejected: 2
    assert sum(p.get_height() for p in hist.patches) == 6
    assert hist.get_title() == "run: 67% of pairs moved towards chosen"


def test_samples_show_first_and_last_beside_chosen_and_rejected(run_dir):
    result = invoke("report", run_dir, "--samples")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "run: greedy answers to 2 held-out prompts, step 0 -> step 20"
    block = result.output.split("index 3")[1].splitlines()
    assert block[0].split() == ["prompt:", "Question", "number", "3?"]
    assert [part.strip() for part in block[1].split("|")] == ["step 0", "step 20"]
    assert [part.strip() for part in block[2].split("|")] == ["answer at step 0", "answer at step 20"]
    assert [part.strip() for part in block[3].split("|")] == ["chosen", "rejected"]
    assert [part.strip() for part in block[4].split("|")] == ["Good answer 3.", "Bad answer 3."]
    assert "step 10" not in result.output


def test_missing_files_are_one_line_errors(run_dir):
    (run_dir / "samples.jsonl").unlink()
    result = invoke("report", run_dir, "--samples")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {run_dir}: no samples.jsonl (train with --eval-generate N to write the " \
                                    "policy's answers)"
    (run_dir / "eval_pairs.parquet").unlink()
    result = invoke("report", run_dir, "--pairs")
    assert result.exit_code == 1 and f"Error: {run_dir}: no eval_pairs.parquet" in result.output


def test_shorten():
    assert shorten("a\n b   c", 20) == "a ⏎ b c"
    assert shorten("abcdefghij", 5) == "abcd…"


STALE_ARGS = ["--iters", 2, "--batch-size", 3, "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-eval", 2,
              "--steps-per-save", 2, "--eval-generate", 2, "--eval-max-tokens", 4]


def _text_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(("prompt", "chosen", "rejected"))]


def test_a_cache_rebuilt_in_place_is_not_decoded_and_both_identities_are_named(tiny_model_dir, tmp_path):
    """The run's cache path rebuilt (`precompute --overwrite`, held-out rows reversed): its `index`
    values now point at other pairs, so report shows the numbers and one line naming the cache, its
    identity now and the one config.yaml recorded, instead of other pairs' text."""
    run = tiny_models.run_cli
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    tiny_models.write_jsonl(tmp_path / "data" / "valid.jsonl", rows[3:9])
    cache = tmp_path / "caches" / "main"
    run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", cache)
    run("train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", *STALE_ARGS)
    trained_on = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["cache_identity"]
    before = run("report", tmp_path / "run", "--pairs", "--top", 2).output
    assert _text_lines(before) and "not shown" not in before

    tiny_models.write_jsonl(tmp_path / "data" / "valid.jsonl", rows[3:9][::-1])
    run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", cache, "--overwrite")
    now = json.loads((cache / "manifest.json").read_text())["identity"]
    assert now != trained_on
    after = run("report", tmp_path / "run", "--pairs", "--top", 2).output
    samples = run("report", tmp_path / "run", "--samples").output
    assert [line for line in before.splitlines() if "index" in line] == \
        [line for line in after.splitlines() if "index" in line]  # the run's numbers did not change
    for output in (after, samples):
        assert not [t for t in _text_lines(output) if not t.startswith("prompt")], output  # no other pair's answers
        note = [line for line in output.splitlines() if "not shown" in line]
        assert len(note) == 1 and str(cache) in note[0] and now in note[0] and trained_on in note[0], output


@pytest.fixture
def bare_run(tmp_path):
    run = tmp_path / "bare-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"cache": str(tmp_path / "no-cache"), "model": "m", "beta": 0.1}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "eval", "loss": 0.69}) + "\n")
    return run


def _console_report(*args):
    """The console command as a user runs it (its one-line error handler is in mlx_dpo.cli.main)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mlx_dpo", "report", *map(str, args)], capture_output=True, text=True)


def _one_line_naming(result, *parts):
    lines = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode != 0 and len(lines) == 1 and all(p in lines[0] for p in parts)


GOOD_SAMPLE = json.dumps({"step": 0, "index": 1, "prompt": "x", "completion": "y", "finish_reason": "stop"})


@pytest.mark.parametrize("text, parts", [
    (GOOD_SAMPLE + "\n\n" + '{"step": 2, "ind', ("samples.jsonl:3: not a JSON line",)),  # a cut last line
    (GOOD_SAMPLE + "\n" + json.dumps({"step": 2, "index": 1, "prompt": "x"}), ("samples.jsonl:2: no field completion",)),
])
def test_a_damaged_samples_line_is_named_by_file_and_line(bare_run, text, parts):
    (bare_run / "samples.jsonl").write_text(text)
    result = _console_report(bare_run, "--samples")
    assert _one_line_naming(result, *parts), result.stdout + result.stderr


def test_an_eval_pairs_file_without_a_column_or_not_parquet_is_named(bare_run):
    table = pa.table({"step": [0], "index": [0], "k": pa.array([0], pa.int32()),
                      "ref_margin": pa.array([1.0], pa.float32()), "policy_margin": pa.array([1.0], pa.float32())})
    pq.write_table(table, bare_run / "eval_pairs.parquet")
    result = _console_report(bare_run, "--pairs")
    assert _one_line_naming(result, "eval_pairs.parquet: no column reward_margin"), result.stdout + result.stderr
    (bare_run / "eval_pairs.parquet").write_bytes(b"PAR1 cut short")
    result = _console_report(bare_run, "--pairs")
    assert _one_line_naming(result, "eval_pairs.parquet: not a readable parquet file"), result.stdout + result.stderr
