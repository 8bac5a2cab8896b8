"""train end to end on the tiny model: step-0 invariant, lean trainer, outputs, adapters mlx-lm loads."""

import json
import math
import shutil
import subprocess
import sys

import pytest

import tiny_models

METRICS = {"step", "split", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
           "rewards/margins", "logps/chosen", "logps/rejected", "ntoks"}
TRAIN_ONLY = {"tokens_per_sec", "peak_memory_gb", "learning_rate", "grad_norm", "compiled_shapes"}


run = tiny_models.invoke_cli


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Precompute from a reference copy, then delete it: training must never need the reference."""
    root = tmp_path_factory.mktemp("train")
    reference, policy, data = root / "reference", root / "policy", root / "data"
    shutil.copytree(tiny_model_dir, reference)
    shutil.copytree(tiny_model_dir, policy)
    rows = tiny_models.standard_rows()
    data.mkdir()
    tiny_models.write_jsonl(data / "train.jsonl", rows)
    tiny_models.write_jsonl(data / "valid.jsonl", rows[:4])
    result = run("precompute", "--model", reference, "--data", data, "--out", root / "cache")
    assert result.exit_code == 0, result.output
    shutil.rmtree(reference)
    return root


def train(setup, out, *extra):
    return run("train", "--cache", setup / "cache", "--model", setup / "policy", "--output", setup / out,
               "--iters", 4, "--batch-size", 4, "--learning-rate", 1e-2, "--steps-per-report", 1,
               "--steps-per-eval", 2, "--steps-per-save", 2, *extra)


def test_lora_run_step0_invariant_and_outputs(setup):
    result = train(setup, "run-lora")
    assert result.exit_code == 0, result.output
    run_dir = setup / "run-lora"
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]

    # Step 1 is scored before any update: the policy is the reference.
    first = records[1]
    assert (first["step"], first["split"]) == (1, "train")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4

    assert records[0]["split"] == "eval" and records[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    records = records[1:]  # the step-0 evaluation, before any update
    assert [(r["step"], r["split"]) for r in records] == [
        (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval")]
    for r in records:
        assert METRICS <= set(r) and (TRAIN_ONLY <= set(r)) == (r["split"] == "train")
    # the distinct input shapes the compiled step was traced for so far (bounded: test_stream.py)
    shapes = [r["compiled_shapes"] for r in records if r["split"] == "train"]
    assert shapes == sorted(shapes) and 1 <= shapes[-1] <= 4
    assert f"Compiled step: {shapes[-1]} distinct input shapes (one trace each) in 4 steps" in result.output
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "0000002_adapters.safetensors", "0000004_adapters.safetensors", "adapter_config.json",
        "adapters.safetensors", "checkpoints", "config.yaml", "eval_pairs.parquet", "metrics.jsonl"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "0000004").iterdir()) == [
        "adapters.safetensors", "optimizer.safetensors", "state.json"]  # only the newest is kept
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["0000004"]


def test_adapters_load_in_mlx_lm_and_change_the_model(setup):
    import mlx.core as mx
    from mlx_lm import load

    run_dir = setup / "run-lora"
    base, _ = load(str(setup / "policy"))
    tuned, tokenizer = load(str(setup / "policy"), adapter_path=str(run_dir))
    ids = mx.array([tokenizer.encode("The quick brown fox")])
    assert mx.abs(base(ids) - tuned(ids)).max().item() > 1e-4


def test_mlx_lm_generate_accepts_the_adapter_path(setup):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(setup / "policy"), "--adapter-path",
         str(setup / "run-lora"), "--prompt", "Hello", "--max-tokens", "3", "--ignore-chat-template"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr


def test_loss_falls_on_a_fixed_batch(setup):
    """All 12 rows fit one batch, so every step sees the same pairs: a right-signed gradient must
    lower the loss step after step (a sign error in the loss or the rewards would raise it)."""
    result = train(setup, "run-fixed", "--batch-size", 16, "--learning-rate", 1e-3, "--lr-schedule", "constant")
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in open(setup / "run-fixed" / "metrics.jsonl")
              if '"train"' in line]
    assert len(losses) == 4 and all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_other_fine_tune_types(setup, kind):
    from mlx_lm import load

    result = train(setup, f"run-{kind}", "--fine-tune-type", kind, "--num-layers", 1)
    assert result.exit_code == 0, result.output
    first = [json.loads(line) for line in open(setup / f"run-{kind}" / "metrics.jsonl")][1]
    assert (first["step"], first["split"]) == (1, "train")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    load(str(setup / "policy"), adapter_path=str(setup / f"run-{kind}"))


def test_refuses_a_cache_from_another_tokenizer(setup, tmp_path):
    other = tmp_path / "other"
    tiny_models.build_llama(other, tokenizer_dir=None, seed=1)
    (other / "tokenizer.json").unlink()
    tiny_models.build_tokenizer(other, vocab_size=350)
    result = run("train", "--cache", setup / "cache", "--model", other, "--output", tmp_path / "run")
    assert result.exit_code == 1
    assert result.output.startswith("Error: tokenizer differs: cache ")


def test_refuses_to_overwrite_a_run(setup):
    result = train(setup, "run-lora")
    assert result.exit_code == 1 and "already holds a run" in result.output


def test_grad_accumulation_equals_one_big_batch(setup):
    """One step over 12 pairs as a single batch, or as 2 accumulated micro-batches of 6, must give
    the same update (the mean of the two micro-batch gradients is the full-batch gradient)."""
    import mlx.core as mx

    def one_step(out, *args):
        result = train(setup, out, "--iters", 1, "--lr-schedule", "constant", "--max-grad-norm", 0, *args)
        assert result.exit_code == 0, result.output
        return mx.load(str(setup / out / "adapters.safetensors"))

    full = one_step("acc-full", "--batch-size", 12)
    accumulated = one_step("acc-2x6", "--batch-size", 6, "--grad-accumulation-steps", 2)
    half = one_step("acc-half", "--batch-size", 6)
    diff = lambda a, b: max(mx.abs(a[k] - b[k]).max().item() for k in a)  # noqa: E731
    # Adam divides by |g|, which magnifies float rounding where a gradient is ~0; compare to a real change.
    assert diff(full, accumulated) < 0.01 * diff(full, half), (diff(full, accumulated), diff(full, half))


def test_unreadable_model_is_one_clear_line(setup, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(setup / "policy", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    result = run("train", "--cache", setup / "cache", "--model", broken, "--output", tmp_path / "run")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {broken}: could not load the model")
    assert len(result.output.strip().splitlines()) == 1
