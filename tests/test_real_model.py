"""The whole product on a real model no one here wrote: SmolLM2-135M-Instruct (see real_model.py).

The cached log-probs are checked against an exact float64 torch computation of the same token ids,
one sequence at a time: they must be within twice the error of a plain float32 torch forward.
"""

import json
import math

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.smollm2 import write_arithmetic_data
from real_model import realistic_rows, torch_sequence_logps
from tiny_models import run_cli

MAX_LENGTH = 160


def _cached_rows(cache):
    return sorted((r for path in sorted(cache.glob("train/part-*.parquet")) for r in pq.read_table(path).to_pylist()),
                  key=lambda r: r["index"])


@pytest.fixture(scope="module")
def realistic_cache(smollm2, tmp_path_factory):
    data = tiny_models.write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", realistic_rows())
    out = tmp_path_factory.mktemp("smollm2") / "cache"
    run_cli("precompute", "--model", smollm2, "--data", data, "--out", out, "--max-length", MAX_LENGTH,
         "--truncation-mode", "keep_start")
    return out


def test_mlx_lm_loads_it(smollm2):
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(smollm2))
    assert len(model.layers) == 30 and model.args.tie_word_embeddings
    assert model.args.rope_theta == 100000.0
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the default system prompt


def test_cached_logps_equal_float64_within_float32_error(smollm2, realistic_cache):
    """Before the two-level logsumexp every cached value sat +0.001..+0.011 nats above exact (about
    ten times float32 torch's error, always positive); with config.json's rope_parameters misread,
    1-2 nats off."""
    import torch

    rows = _cached_rows(realistic_cache)
    assert len(rows) == len(realistic_rows())  # every realistic row is trainable
    assert max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows) > MAX_LENGTH  # one is truncated
    exact = torch_sequence_logps(smollm2, rows, torch.float64, MAX_LENGTH, "keep_start")
    plain = torch_sequence_logps(smollm2, rows, torch.float32, MAX_LENGTH, "keep_start")
    ours = [[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows]
    float32_error = max(abs(p - e) for ps, es in zip(plain, exact) for p, e in zip(ps, es))
    our_error = max(abs(o - e) for os_, es in zip(ours, exact) for o, e in zip(os_, es))
    print(f"max |error| vs float64: ours {our_error:.2e}, torch float32 {float32_error:.2e}")
    assert our_error <= 2 * float32_error


def test_step_one_is_ln2(smollm2, realistic_cache, tmp_path):
    """The policy starts as the reference: at step 1 every pair's loss is ln 2 (one shared log-prob function)."""
    run = tmp_path / "run"
    run_cli("train", "--cache", realistic_cache, "--model", smollm2, "--output", run, "--iters", 1,
         "--batch-size", 2, "--num-layers", 2, "--steps-per-report", 1)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["split"] == "train"
    assert first["loss"] == pytest.approx(math.log(2), abs=2e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=2e-4)


@pytest.mark.slow
def test_short_lora_run_raises_heldout_reward_accuracy(smollm2, tmp_path):
    """Right vs wrong arithmetic, held out on operands never seen in training: the data of
    examples/smollm2-135m cut to 48 training rows (one pass: 12 steps of 4 pairs), its LoRA settings.

    Cost (measured on 2 cores shared with ~12 busy processes, OpenBLAS at 1 thread): precompute 47 CPU s,
    a step 3.3 CPU s, an evaluation of the 32 held-out pairs 19 CPU s; the compiled step traces twice in the
    whole run (every batch is (8, 96) tokens; the second trace comes when the first update creates the
    optimizer state). Held-out accuracy went 0.469 -> 0.781 (seed 0) and 0.469 -> 0.875 (seed 1), margins
    +0.28 and +0.25. At step 0 the policy is the reference and its rewards are float noise (~1e-7)."""
    data, cache, run = write_arithmetic_data(tmp_path / "data", train_rows=48), tmp_path / "cache", tmp_path / "run"
    run_cli("precompute", "--model", smollm2, "--data", data, "--out", cache, "--max-length", 128)
    run_cli("train", "--cache", cache, "--model", smollm2, "--output", run, "--iters", 12, "--batch-size", 4,
            "--learning-rate", 3e-4, "--num-layers", 8, "--steps-per-eval", 12, "--val-batches", -1)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 12]
    assert abs(evals[0]["rewards/margins"]) < 1e-4  # the reference itself
    assert evals[-1]["rewards/accuracies"] > evals[0]["rewards/accuracies"] + 0.2
    assert evals[-1]["rewards/margins"] > 0.1
