"""train --cache A --cache B [--cache-weights]: one run on several caches of one reference, end to end
through the command line and the tiny model: refusals, pairs_per_cache, evaluation, resume."""

import json

import pyarrow.parquet as pq
import pytest

import tiny_models

run = tiny_models.invoke_cli
# Not the run's but the process's: timing, and the shapes this process traced the compiled step for.
TIMING = ("tokens_per_sec", "peak_memory_gb", "compiled_shapes")
# 12 standard + 8 conversational train rows at 0.7/0.3: an epoch of 20 pairs draws 14 from A, 6 from B; in
# global batches of 2 x 2 micro-batches through buffers of 8 rows that is 5 full steps, so 7 steps train
# 28 pairs and resume points fall mid-epoch; dropout, warmup and cosine make every restored state matter.
ARGS = ["--iters", 7, "--batch-size", 2, "--grad-accumulation-steps", 2, "--learning-rate", 1e-2,
        "--warmup-steps", 2, "--lora-dropout", 0.1, "--shuffle-buffer", 8, "--steps-per-report", 1,
        "--steps-per-eval", 3, "--steps-per-save", 2, "--cache-weights", "0.7,0.3"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for name, rows, valid in (("a", tiny_models.standard_rows(), 4), ("b", tiny_models.conversational_rows(), 3)):
        tiny_models.write_jsonl(root / f"data-{name}" / "train.jsonl", rows)
        tiny_models.write_jsonl(root / f"data-{name}" / "valid.jsonl", rows[:valid])
        result = run("precompute", "--model", tiny_model_dir, "--data", root / f"data-{name}", "--out", root / name)
        assert result.exit_code == 0, result.output
    whole = train(root, tiny_model_dir, "whole")
    assert whole.exit_code == 0, whole.output
    return root, tiny_model_dir, whole.output


def train(root, model, out, *extra, caches=("a", "b")):
    return run("train", *[x for c in caches for x in ("--cache", root / c)], "--model", model,
               "--output", root / out, *ARGS, *extra)


def metrics(run_dir):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_pairs_per_cache_add_up_to_the_pairs_trained(setup):
    """Every train line names each cache's pairs since the last report; they add up to the 7 x 4 pairs
    trained, and the first epoch (steps 1-5) holds exactly the 14 + 6 the weights give it."""
    root, _, output = setup
    a, b = str(root / "a"), str(root / "b")
    assert f"Mixture of 2 caches: each epoch of 20 pairs draws 14 from {a} (of its 12), 6 from {b} (of its 8)" in output
    train_lines = [r for r in metrics(root / "whole") if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == list(range(1, 8))
    assert all(list(r["pairs_per_cache"]) == [a, b] and sum(r["pairs_per_cache"].values()) == 4 for r in train_lines)
    assert sum(r["pairs_per_cache"][a] for r in train_lines[:5]) == 14
    assert sum(r["pairs_per_cache"][b] for r in train_lines[:5]) == 6
    assert all("pairs_per_cache" not in r for r in metrics(root / "whole") if r["split"] == "eval")
    config = (root / "whole" / "config.yaml").read_text()
    assert f"cache:\n- {a}\n- {b}\n" in config and "cache_weights: 0.7,0.3" in config



def test_short_batches_count_only_their_pairs(setup):
    """Batches of 3 (no accumulation) through buffers of 8: the epoch's 20 pairs make 8 steps, of 3, 3 and
    2 pairs from each of the first two buffers and 3 and 1 from the last (in a shuffled order), the short
    ones filled up to 3 rows with copies of weight 0 (one compiled row count). pairs_per_cache counts only
    the pairs trained: the 8 steps add up to the 14 + 6 of the epoch, not to 8 x 3."""
    root, model, _ = setup
    result = train(root, model, "short", "--batch-size", 3, "--grad-accumulation-steps", 1, "--iters", 8,
                   "--steps-per-eval", 100, "--steps-per-save", 100)
    assert result.exit_code == 0, result.output
    a, b = str(root / "a"), str(root / "b")
    train_lines = [r for r in metrics(root / "short") if r["split"] == "train"]
    assert sorted(sum(r["pairs_per_cache"].values()) for r in train_lines) == [1, 2, 2, 3, 3, 3, 3, 3]
    assert {c: sum(r["pairs_per_cache"][c] for r in train_lines) for c in (a, b)} == {a: 14, b: 6}


def test_evaluation_scores_the_valid_splits_of_every_cache(setup):
    """Evaluation: A's 4 and B's 3 valid pairs, each once at every evaluation, eval_pairs naming the cache;
    their mean reward margin is the logged rewards/margins; report --pairs names the cache of a pair."""
    root, _, output = setup
    assert "eval on 7 of 7 pairs of the valid splits of 2 caches" in output
    table = pq.read_table(root / "whole" / "eval_pairs.parquet").to_pandas()
    assert list(table.columns[:3]) == ["step", "cache", "index"]
    evals = {r["step"]: r for r in metrics(root / "whole") if r["split"] == "eval"}
    assert sorted(set(table["step"])) == sorted(evals) == [0, 3, 6, 7]
    for step, rows in table.groupby("step"):
        assert sorted(zip(rows["cache"], rows["index"])) == [(str(root / "a"), i) for i in range(4)] + [
            (str(root / "b"), i) for i in range(3)]
        assert rows["reward_margin"].mean() == pytest.approx(evals[step]["rewards/margins"], rel=1e-5, abs=1e-6)
    report = run("report", root / "whole", "--pairs")
    assert report.exit_code == 0, report.output
    assert f"{root / 'a'} index " in report.output or f"{root / 'b'} index " in report.output
    assert "answers not shown" not in report.output and "prompt" in report.output


def test_stopped_then_resumed_equals_uninterrupted(setup):
    import mlx.core as mx

    root, model, _ = setup
    stopped = train(root, model, "stopped", "--stop-after", 3)
    assert stopped.exit_code == 0, stopped.output
    resumed = train(root, model, "stopped", "--resume")
    assert resumed.exit_code == 0 and "after step 3 of 7 (epoch 0, batch 3)" in resumed.output, resumed.output
    assert metrics(root / "stopped") == metrics(root / "whole")  # pairs_per_cache included
    ours, theirs = (mx.load(str(root / d / "adapters.safetensors")) for d in ("stopped", "whole"))
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in theirs)
    for table in (pq.read_table(root / d / "eval_pairs.parquet") for d in ("stopped", "whole")):
        assert table.num_rows == 4 * 7
    other = train(root, model, "stopped", "--resume", "--cache-weights", "0.5,0.5")
    assert other.exit_code == 1 and "cache_weights: run '0.7,0.3', now '0.5,0.5'" in other.output, other.output
    swapped = train(root, model, "stopped", "--resume", "--cache-weights", "0.3,0.7", caches=("b", "a"))
    assert swapped.exit_code == 1 and "cannot resume with other options (cache: run" in swapped.output


def test_pairs_per_cache_stay_exact_when_resuming_off_a_report_step(setup):
    """Reports every 4 steps, stopped (and saved) at step 3: the checkpoint holds the pairs per cache of
    steps 2-3 not yet reported, so the resumed step-4 line counts steps 2-4 as an uninterrupted run does."""
    root, model, _ = setup
    every4 = ("--steps-per-report", 4)
    assert train(root, model, "whole-4", *every4).exit_code == 0
    assert train(root, model, "off-report", *every4, "--stop-after", 3).exit_code == 0
    resumed = train(root, model, "off-report", *every4, "--resume")
    assert resumed.exit_code == 0, resumed.output
    whole, ours = ([r["pairs_per_cache"] for r in metrics(root / d) if r["split"] == "train"]
                   for d in ("whole-4", "off-report"))
    assert len(whole) == 3 and ours == whole  # steps 1, 4 and 7
    assert sum(sum(counts.values()) for counts in ours) == 7 * 4


@pytest.fixture(scope="module")
def other_caches(setup, tmp_path_factory):
    """The same data precomputed with another max_length, and with another reference model."""
    root, model, _ = setup
    other_model = tmp_path_factory.mktemp("other-llama")
    tiny_models.build_llama(other_model, tokenizer_dir=model, seed=1)
    for name, args in (("long", ["--model", model, "--max-length", 64]), ("other", ["--model", other_model])):
        result = run("precompute", *args, "--data", root / "data-b", "--out", root / name)
        assert result.exit_code == 0, result.output
    return root, model


@pytest.mark.parametrize("cache, field", [
    ("long", "options.max_length differs: {a} 1024, {x} 64"),
    ("other", "reference_weights differs: {a} "),
])
def test_refused_unless_one_reference(other_caches, cache, field):
    root, model = other_caches
    result = run("train", "--cache", root / "a", "--cache", root / cache, "--model", model, "--output", root / "refused")
    expected = (f"Error: --cache {root / cache} cannot be trained with --cache {root / 'a'}: not the same reference ("
                + field.format(a=root / "a", x=root / cache))
    assert result.exit_code == 1 and result.output.startswith(expected), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (root / "refused").exists()


@pytest.mark.parametrize("weights, message", [
    ("0.7", "--cache-weights 0.7: 1 weight for 2 --cache; give one per --cache, in the same order"),
    ("0.5,0.3,0.2", "--cache-weights 0.5,0.3,0.2: 3 weights for 2 --cache"),
    ("0.7,-0.3", "--cache-weights 0.7,-0.3: -0.3 is not a weight (a finite number >= 0)"),
    ("0.7,a", "--cache-weights 0.7,a: 'a' is not a number"),
    ("0.7,nan", "--cache-weights 0.7,nan: nan is not a weight (a finite number >= 0)"),
    ("0,0", "--cache-weights 0,0: all weights are 0; at least one cache needs a positive weight"),
])
def test_bad_cache_weights_are_one_line(tmp_path, weights, message):
    result = run("train", "--cache", tmp_path / "a", "--cache", tmp_path / "b", "--model", tmp_path / "m",
                 "--output", tmp_path / "run", "--cache-weights", weights)
    assert result.exit_code == 1 and result.output.startswith(f"Error: {message}"), result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights", ["1", "0.3", "0.5,0.5"])
def test_cache_weights_for_one_cache_are_refused(tmp_path, weights):
    """One --cache is trained alike under any weight, so --cache-weights there is a mistake: say so."""
    result = run("train", "--cache", tmp_path / "a", "--model", tmp_path / "m", "--output", tmp_path / "run",
                 "--cache-weights", weights)
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: --cache-weights {weights}: one --cache has nothing to weigh against; the weights share each "
        "epoch among several --cache (leave --cache-weights out, or add a --cache)"), result.output
    assert not (tmp_path / "run").exists()


def test_a_cache_given_twice_is_refused(tmp_path):
    result = run("train", "--cache", tmp_path / "a", "--cache", tmp_path / "a", "--model", tmp_path / "m",
                 "--output", tmp_path / "run")
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: --cache {tmp_path / 'a'} is given twice; to draw more of it, use --cache-weights")


@pytest.mark.parametrize("second", ["./a/", "link", "{tmp}/a"])
def test_the_same_cache_under_another_spelling_is_refused_like_a_repeated_one(tmp_path, monkeypatch, second):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    second = second.format(tmp=tmp_path)
    result = run("train", "--cache", "a", "--cache", second, "--model", tmp_path / "m", "--output", tmp_path / "run")
    assert result.exit_code == 1 and result.output.strip() == (
        f"Error: --cache {second} is given twice (the same cache as --cache a); to draw more of it, use --cache-weights")
    assert not (tmp_path / "run").exists()


def test_the_same_remote_cache_with_a_trailing_slash_is_refused():
    from mlx_dpo.trainer.config import same_cache

    assert same_cache("s3://bucket/caches/a/") == same_cache("s3://bucket/caches/a") != same_cache("s3://bucket/caches/b")
