"""RUN/eval_pairs.parquet and RUN/samples.jsonl, end to end on the tiny model: their values agree with the
logged eval metrics, mlx-lm's own generation, a resumed run and several rejected answers."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tiny_models
from mlx_dpo.cli import cli

# LoRA dropout draws from the RNG every step: generating must not disturb the run (nor resuming it).
ARGS = ["--iters", 4, "--batch-size", 3, "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-eval", 2,
        "--steps-per-save", 2, "--eval-generate", 2, "--eval-max-tokens", 6, "--lora-dropout", 0.1]


run = tiny_models.invoke_cli


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """One cache with one rejected answer per prompt, one with two; 5 valid pairs (batches of 3: 3 + 2)."""
    root = tmp_path_factory.mktemp("eval-pairs")
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(root / "data" / "train.jsonl", rows)
    tiny_models.write_jsonl(root / "data" / "valid.jsonl", rows[3:8])
    several = [{**r, "rejected": [r["rejected"], r["chosen"] + " Maybe not."]} for r in rows]
    tiny_models.write_jsonl(root / "several" / "train.jsonl", several)
    tiny_models.write_jsonl(root / "several" / "valid.jsonl", several[3:8])
    for name in ("data", "several"):
        result = run("precompute", "--model", tiny_model_dir, "--data", root / name, "--out", root / f"cache-{name}")
        assert result.exit_code == 0, result.output
    return root


def train(root, model, out, *extra, cache="cache-data"):
    result = run("train", "--cache", root / cache, "--model", model, "--output", root / out, *ARGS, *extra)
    assert result.exit_code == 0, result.output
    return root / out


def evals(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == "eval"}


def assert_pairs_match_metrics(run_dir, rows_per_step):
    table = pq.read_table(run_dir / "eval_pairs.parquet").to_pandas()
    logged = evals(run_dir)
    assert sorted(table["step"].unique()) == sorted(logged) == [0, 2, 4]
    for step, record in logged.items():
        rows = table[table["step"] == step]
        assert len(rows) == rows_per_step
        assert rows["reward_margin"].mean() == pytest.approx(record["rewards/margins"], rel=1e-5, abs=1e-6)
        assert (rows["reward_margin"] > 0).mean() == pytest.approx(record["rewards/accuracies"], abs=1e-6)
        beta = 0.1  # reward margin = β·(policy margin - reference margin), per row
        np.testing.assert_allclose(rows["reward_margin"], beta * (rows["policy_margin"] - rows["ref_margin"]),
                                   rtol=1e-4, atol=1e-6)
    return table


def test_eval_pairs_equal_the_logged_metrics_and_samples_equal_mlx_lm(root, tiny_model_dir):
    run_dir = train(root, tiny_model_dir, "run")
    table = assert_pairs_match_metrics(run_dir, rows_per_step=5)
    cache_rows = pq.read_table(root / "cache-data" / "valid" / "part-00000.parquet").to_pandas().set_index("index")
    first = table[table["step"] == 0].set_index("index")
    assert sorted(first.index) == sorted(cache_rows.index) and (first["k"] == 0).all()
    ref = cache_rows["ref_chosen_logps"] - cache_rows["ref_rejected_logps"]
    np.testing.assert_allclose(first["ref_margin"], ref[first.index], rtol=1e-6)
    # Step 0: the policy is the reference, so its margins are the cache's, to float32 rounding.
    np.testing.assert_allclose(first["policy_margin"], first["ref_margin"], atol=1e-3)
    last = table[table["step"] == 4]
    assert np.abs(last["policy_margin"] - last["ref_margin"]).max() > 1e-3  # training moved them

    # samples.jsonl: the 2 lowest valid indices at steps 0, 2 and 4, equal to mlx-lm's own greedy generation
    # of the base model (step 0) and of the model with the saved adapters (step 4).
    from mlx_lm import load, stream_generate

    samples = [json.loads(line) for line in open(run_dir / "samples.jsonl")]
    assert [(s["step"], s["index"]) for s in samples] == [(0, 0), (0, 1), (2, 0), (2, 1), (4, 0), (4, 1)]
    for step, adapters in ((0, None), (4, str(run_dir))):
        model, tokenizer = load(str(tiny_model_dir), adapter_path=adapters)
        for sample in (s for s in samples if s["step"] == step):
            prompt_ids = cache_rows.loc[sample["index"], "prompt_ids"].tolist()
            assert sample["prompt"] == tokenizer.decode(prompt_ids)
            responses = list(stream_generate(model, tokenizer, prompt_ids, max_tokens=6))
            tokens = [r.token for r in responses if r.token not in tokenizer.eos_token_ids]
            assert sample["completion"] == tokenizer.decode(tokens)
            assert sample["finish_reason"] == responses[-1].finish_reason
    assert samples[-1]["completion"] != samples[1]["completion"] or samples[-2]["completion"] != samples[0]["completion"]

    report = run("report", run_dir, "--pairs", "--samples")  # the report reads this real run
    assert report.exit_code == 0 and "5 held-out pairs, evaluated at steps [0, 2, 4]" in report.output
    moved = int((last["reward_margin"] > 0).sum())
    assert f"moved towards chosen (reward margin > 0, as rewards/accuracies counts): {moved} (" in report.output
    assert "greedy answers to 2 held-out prompts, step 0 -> step 4" in report.output

    again = train(root, tiny_model_dir, "run-again")  # greedy: the same run writes the same answers
    assert (again / "samples.jsonl").read_text() == (run_dir / "samples.jsonl").read_text()
    quiet = train(root, tiny_model_dir, "run-quiet", "--eval-generate", 0)  # generating changes no number
    timing = ("tokens_per_sec", "peak_memory_gb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in map(json.loads, open(quiet / "metrics.jsonl"))] \
        == [{k: v for k, v in r.items() if k not in timing} for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


def test_a_resumed_run_writes_each_evaluation_once(root, tiny_model_dir):
    """Stopped at step 2 (checkpoint at 2), resumed: evaluations 0, 2, 4 each once, equal to the
    uninterrupted run's; evaluations written past the checkpoint before a crash are dropped."""
    whole = root / "run"
    if not whole.exists():
        train(root, tiny_model_dir, "run")
    stopped = train(root, tiny_model_dir, "stopped", "--stop-after", 2)
    assert sorted(pq.read_table(stopped / "eval_pairs.parquet")["step"].unique().to_pylist()) == [0, 2]
    # As if the run had died after evaluating at steps 3 and 4 but before a checkpoint: stale evaluations
    # (step 3: as if it had run with another --steps-per-eval, which a resumed run may change).
    table = pq.read_table(whole / "eval_pairs.parquet")
    step3 = table.filter(pc.equal(table["step"], 4)).set_column(0, "step", pa.array([3] * 5, pa.int64()))
    pq.write_table(pa.concat_tables([table, step3]), stopped / "eval_pairs.parquet")
    (stopped / "samples.jsonl").write_text((whole / "samples.jsonl").read_text() + '{"step": 3, "index": 9}\n')
    train(root, tiny_model_dir, "stopped", "--resume")
    resumed = pq.read_table(stopped / "eval_pairs.parquet").to_pandas()
    assert resumed["step"].tolist() == [0] * 5 + [2] * 5 + [4] * 5
    assert resumed.equals(table.to_pandas())  # the values of the uninterrupted run
    assert (stopped / "samples.jsonl").read_text() == (whole / "samples.jsonl").read_text()


def test_overwrite_starts_the_files_again(root, tiny_model_dir):
    run_dir = train(root, tiny_model_dir, "over")
    train(root, tiny_model_dir, "over", "--overwrite", "--eval-generate", 0, "--iters", 2)
    assert pq.read_table(run_dir / "eval_pairs.parquet")["step"].unique().to_pylist() == [0, 2]
    assert not (run_dir / "samples.jsonl").exists()


def test_several_rejected_answers_give_one_row_per_comparison(root, tiny_model_dir):
    run_dir = train(root, tiny_model_dir, "several", cache="cache-several")
    table = assert_pairs_match_metrics(run_dir, rows_per_step=10)  # 5 pairs x 2 rejected answers
    cache_rows = pq.read_table(root / "cache-several" / "valid" / "part-00000.parquet").to_pylist()
    first = table[table["step"] == 0]
    for row in cache_rows:
        for k in range(2):
            cell = first[(first["index"] == row["index"]) & (first["k"] == k)]
            assert cell["ref_margin"].item() == pytest.approx(row["ref_chosen_logps"] - row["ref_rejected_logps"][k])


@pytest.mark.parametrize("option", [["--ld-alpha", "0.5"], ["--reference-free"]])
def test_ld_alpha_and_reference_free_rows_are_the_losss_values(root, tiny_model_dir, option):
    """--ld-alpha: margins of the length-weighted log-probs (so ref_margin is not the cache's plain one);
    --reference-free: reward_margin = β·policy_margin. Means still equal the logged metrics."""
    run_dir = train(root, tiny_model_dir, "run" + option[0], *option, "--iters", 2, "--eval-generate", 0)
    table = pq.read_table(run_dir / "eval_pairs.parquet").to_pandas()
    for step, record in evals(run_dir).items():
        rows = table[table["step"] == step]
        assert rows["reward_margin"].mean() == pytest.approx(record["rewards/margins"], rel=1e-5, abs=1e-6)
        assert (rows["reward_margin"] > 0).mean() == pytest.approx(record["rewards/accuracies"], abs=1e-6)
        reference = 0 if option == ["--reference-free"] else rows["ref_margin"]
        np.testing.assert_allclose(rows["reward_margin"], 0.1 * (rows["policy_margin"] - reference), rtol=1e-4,
                                   atol=1e-6)
    cache = pq.read_table(root / "cache-data" / "valid" / "part-00000.parquet").to_pandas().set_index("index")
    plain = (cache["ref_chosen_logps"] - cache["ref_rejected_logps"])[table["index"]].to_numpy()
    if option == ["--ld-alpha", "0.5"]:  # the tails (tokens past the shorter answer) count half
        tails = (cache["ref_chosen_tail_logps"] - cache["ref_rejected_tail_logps"])[table["index"]].to_numpy()
        np.testing.assert_allclose(table["ref_margin"], plain - 0.5 * tails, rtol=1e-5, atol=1e-5)
        assert np.abs(tails).max() > 0.1
    else:
        np.testing.assert_allclose(table["ref_margin"], plain, rtol=1e-6)


def test_eval_generate_needs_a_valid_split(root, tiny_model_dir, tmp_path):
    tiny_models.write_jsonl(tmp_path / "train.jsonl", tiny_models.standard_rows())
    assert run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "train.jsonl", "--out",
               tmp_path / "cache").exit_code == 0
    result = CliRunner().invoke(cli, ["train", "--cache", str(tmp_path / "cache"), "--model", str(tiny_model_dir),
                                      "--output", str(tmp_path / "run"), "--eval-generate", "2"])
    assert result.exit_code == 1
    assert "--eval-generate needs a cache with a valid split" in result.output


GATHER_SCRIPT = """
import json, sys
import numpy as np
import mlx_dpo
import mlx.core as mx
from mlx_dpo.trainer.pair_log import PairCollector

group = mx.distributed.init()
rank = group.rank()
collector = PairCollector()
for first in ([10, 4, 7] if rank == 0 else [5]) if sys.argv[2] == "uneven" else ([] if rank == 0 else [3, 1]):
    values = {"policy_chosen": np.array([first * 1.0]), "ref_chosen": np.array([0.0]),
              "policy_rejected": np.array([[0.5, 1.5]]), "ref_rejected": np.array([[0.0, 0.0]]),
              "reward_margin": np.array([[first + 0.25, first - 0.25]])}
    collector.add(np.array([first]), values)
columns = collector.columns(group)
if rank == 0:
    json.dump({k: v.tolist() for k, v in columns.items()}, open(sys.argv[1], "w"))
"""


@pytest.mark.parametrize("layout", ["uneven", "one rank empty"])
def test_ranks_with_different_pair_counts_gather_every_pair(tmp_path, layout):
    """Under mlx.launch, ranks hold different numbers of eval pairs (a global batch does not split evenly);
    rank 0 gets all of them, sorted by (index, k)."""
    import subprocess
    import sys

    script, out = tmp_path / "gather.py", tmp_path / "out.json"
    script.write_text(GATHER_SCRIPT)
    result = subprocess.run([*tiny_models.ring_launch(2), sys.executable, str(script), str(out),
                             layout.split()[0]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    columns = json.loads(out.read_text())
    indices = [4, 5, 7, 10] if layout == "uneven" else [1, 3]
    assert columns["index"] == [i for i in indices for _ in range(2)] and columns["k"] == [0, 1] * len(indices)
    assert columns["reward_margin"] == [v for i in indices for v in (i + 0.25, i - 0.25)]
    assert columns["policy_margin"] == [v for i in indices for v in (i - 0.5, i - 1.5)]


def test_pair_columns_flatten_k_and_leave_out_stand_in_rows():
    """2 pairs x K = 2; the second pair has weight 0 (a stand-in that only keeps a rank in step)."""
    from mlx_dpo.trainer.pair_log import pair_columns

    values = {"policy_chosen": np.array([-1.0, -2.0]), "ref_chosen": np.array([-1.5, -2.0]),
              "policy_rejected": np.array([[-3.0, -4.0], [-5.0, -6.0]]),
              "ref_rejected": np.array([[-3.0, -3.0], [-5.0, -5.0]]), "reward_margin": np.array([[0.1, 0.2], [0.3, 0.4]])}
    columns = pair_columns(np.array([7, 9]), values)
    assert columns["index"].tolist() == [7, 7, 9, 9] and columns["k"].tolist() == [0, 1, 0, 1]
    assert columns["policy_margin"].tolist() == [2.0, 3.0, 3.0, 4.0]  # chosen - rejected_k
    assert columns["ref_margin"].tolist() == [1.5, 1.5, 3.0, 3.0]
    kept = pair_columns(np.array([7, 9]), values, weights=np.array([1.0, 0.0]))
    assert kept["index"].tolist() == [7, 7] and kept["reward_margin"].tolist() == pytest.approx([0.1, 0.2])


def test_both_files_are_written_durably(tmp_path, fsynced):
    """Each write goes to a temp file that is fsynced, renamed over the file, and the folder fsynced."""
    from conftest import atomic_temp_name
    from mlx_dpo.trainer.pair_log import PairLog
    from mlx_dpo.trainer.samples import SampleLog

    columns = {"index": np.array([3]), "k": np.array([0], np.int32), "ref_margin": np.array([1.0], np.float32),
               "policy_margin": np.array([2.0], np.float32), "reward_margin": np.array([0.1], np.float32)}
    PairLog(tmp_path).append(0, columns)
    SampleLog(tmp_path).append(0, [{"index": 3, "prompt": "p", "completion": "c", "finish_reason": "stop"}])
    names = [p.rsplit("/", 1)[-1] for p in fsynced]
    assert atomic_temp_name(tmp_path / "eval_pairs.parquet") in names and atomic_temp_name(tmp_path / "samples.jsonl") in names
    assert fsynced.count(str(tmp_path)) >= 2  # the folder, after each rename
    assert pq.read_table(tmp_path / "eval_pairs.parquet").to_pylist() == [
        {"step": 0, "index": 3, "k": 0, "ref_margin": 1.0, "policy_margin": 2.0, "reward_margin": pytest.approx(0.1)}]


def test_held_out_prompts_are_the_first_distinct_ones(tmp_path):
    from mlx_dpo.trainer.samples import held_out_prompts

    for name, indices, prompts in (("b", [5, 1], [[7], [8, 9]]), ("a", [0, 3, 2], [[8, 9], [6], [8, 9]])):
        pq.write_table(pa.table({"index": indices, "prompt_ids": prompts}), tmp_path / f"{name}.parquet")
    shards = [tmp_path / "b.parquet", tmp_path / "a.parquet"]
    # by index: 0 [8, 9], 1 [8, 9] (again), 2 [8, 9] (again), 3 [6], 5 [7]
    assert held_out_prompts(shards, 2) == [(0, [8, 9]), (3, [6])]
    assert held_out_prompts(shards, 9) == [(0, [8, 9]), (3, [6]), (5, [7])]
