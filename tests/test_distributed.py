"""Scale out: 2 ranks through `mlx.launch --backend ring` on localhost, and shard jobs + `cache merge`.
Each must give what one process gives."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import tiny_models

BIN = Path(sys.executable).parent
TRAIN_ARGS = ["--iters", "4", "--learning-rate", "1e-3", "--steps-per-report", "1", "--steps-per-eval", "2",
              "--lr-schedule", "constant", "--eval-generate", "1", "--eval-max-tokens", "4"]


run = tiny_models.invoke_cli


def launch(*args, program=(BIN / "mlx-dpo",)):
    """`mlx.launch --backend ring -n 2 mlx-dpo ...` (or `program ...`): two real ranks on localhost;
    stdout + stderr. (mlx.launch exits 0 even when its ranks exit 1: callers check the output.)"""
    command = [*tiny_models.ring_launch(2), *map(str, program), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


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


def test_two_ranks_rebuild_a_cache_with_overwrite(setup, tmp_path):
    """--overwrite under mlx.launch: the ranks write beside the old cache, rank 0 swaps the new one in."""
    root, args = setup
    shutil.copytree(root / "single", tmp_path / "caches" / "ranks")
    assert run("precompute", *args, "--max-length", 40, "--out", tmp_path / "single40").exit_code == 0
    launch("precompute", *args, "--max-length", 40, "--out", tmp_path / "caches" / "ranks", "--overwrite")
    assert shards(tmp_path / "caches" / "ranks") == shards(tmp_path / "single40") != shards(root / "single")
    assert not (tmp_path / "caches" / "ranks" / ".mlx-dpo-rebuild").exists()
    assert run("cache", "verify", tmp_path / "caches" / "ranks").exit_code == 0


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
    inputs = [json.loads((path / "manifest.json").read_text())["inputs"] for path in (tmp_path / "merged", root / "single")]
    assert inputs[0] == inputs[1] and inputs[0]["train"]["formats"] == {"standard": 8}  # what encoding found

    missing = run("cache", "merge", tmp_path / "m2", tmp_path / "part0", tmp_path / "part1")
    assert missing.exit_code == 1 and "need shard indices 0..2 exactly once, got [0, 1]" in missing.output
    other = tmp_path / "other"
    assert run("precompute", *args[:-2], "--rows-per-shard", 3, "--max-length", 64, "--out", other,
               "--num-shards", 3, "--shard-index", 2).exit_code == 0
    mixed = run("cache", "merge", tmp_path / "m3", tmp_path / "part0", tmp_path / "part1", other)
    assert mixed.exit_code == 1 and "options.max_length differs" in mixed.output


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def assert_same_numbers(one: list[dict], other: list[dict], what: str) -> None:
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in other], what
    for a, b in zip(one, other):
        for key in ("loss", "nll_loss", "rewards/chosen", "rewards/margins", "logps/chosen", "ntoks"):
            # Same pairs in every step, other batch shapes: equal up to float32 rounding (not accuracies:
            # at step 1 the rewards are 0 up to rounding, and their sign is the rounding).
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-4), (what, a["step"], a["split"], key)


@pytest.fixture(scope="module")
def seven_pairs(tiny_model_dir, tmp_path_factory) -> Path:
    """A cache of 7 train rows and 5 valid rows, in shards of 3."""
    root = tmp_path_factory.mktemp("seven")
    rows = tiny_models.standard_rows()
    (root / "data").mkdir()
    tiny_models.write_jsonl(root / "data" / "train.jsonl", rows[:7])
    tiny_models.write_jsonl(root / "data" / "valid.jsonl", rows[7:12])
    assert run("precompute", "--model", tiny_model_dir, "--data", root / "data", "--out", root / "cache",
               "--rows-per-shard", 3).exit_code == 0
    return root / "cache"


def test_a_step_does_not_depend_on_how_its_global_batch_is_split(tiny_model_dir, seven_pairs, tmp_path):
    """7 train rows (global batches of 4: an epoch is a step of 4 pairs and one of 3) and 5 valid rows,
    a per-pair and a per-token loss: 1 rank x 4 pairs, 2 ranks x 2 pairs, and 1 rank x 2 micro-batches of
    2 (uneven in the step of 3) give the same loss, NLL, rewards and token counts at every step and
    evaluation. A 2-rank run then refuses to resume on 1 rank (its cursor counts 2-rank global batches)."""
    base = ["--cache", seven_pairs, "--model", tiny_model_dir, *TRAIN_ARGS, "--iters", 5]
    args = [*base, "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5"]
    assert run("train", *args, "--output", tmp_path / "one", "--batch-size", 4).exit_code == 0
    result = run("train", *args, "--output", tmp_path / "accumulated", "--batch-size", 2, "--grad-accumulation-steps", 2)
    assert result.exit_code == 0, result.output
    output = launch("train", *args, "--output", tmp_path / "two", "--batch-size", 2)
    one = metrics(tmp_path / "one")
    assert_same_numbers(one, metrics(tmp_path / "two"), "2 ranks")
    assert_same_numbers(one, metrics(tmp_path / "accumulated"), "2 micro-batches")
    assert "Global batch 2 x 2 ranks x 1 micro-batches = 4 pairs per step" in output
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    # eval_pairs.parquet: rank 0 wrote every rank's pairs (5 valid rows split 3 + 2), the 1-rank run's rows
    one_pairs, two_pairs = (pq.read_table(tmp_path / name / "eval_pairs.parquet").to_pandas() for name in ("one", "two"))
    assert one_pairs[["step", "index", "k"]].equals(two_pairs[["step", "index", "k"]]) and len(one_pairs) == 4 * 5
    np.testing.assert_allclose(two_pairs["reward_margin"], one_pairs["reward_margin"], rtol=1e-4, atol=1e-5)
    samples = [json.loads(line) for line in open(tmp_path / "two" / "samples.jsonl")]
    assert [(s["step"], s["index"]) for s in samples] == [(0, 0), (2, 0), (4, 0), (5, 0)]  # rank 0 alone generated

    resumed = run("train", *args, "--output", tmp_path / "two", "--batch-size", 2, "--resume")
    assert resumed.exit_code == 1 and "cannot resume with other options (ranks: run 2, now 1)" in resumed.output
    # A loss that sorts across the batch cannot be split over ranks: refused in one line.
    refused = launch("train", *base, "--output", tmp_path / "aot", "--batch-size", 2, "--loss-type", "aot")
    assert "Error: --loss-type aot sorts across the batch: run it on one process (here 2 ranks)" in refused
    assert "exited with code 1" in refused and not (tmp_path / "aot").exists()


def test_a_mixture_on_two_ranks_trains_what_one_rank_trains(tiny_model_dir, tmp_path):
    """Two caches at 0.7/0.3 (7 + 6 train rows: epochs of 13 pairs, 9 + 4, in global batches of 4, 4, 4
    and 1, so a rank gets a stand-in row) and 3 + 3 valid rows: 2 ranks x 2 pairs and 1 rank x 4 give the
    same numbers, the same pairs_per_cache at every report and the same eval_pairs rows."""
    rows = {"a": tiny_models.standard_rows(), "b": tiny_models.conversational_rows()}
    caches = []
    for name, train_rows in (("a", 7), ("b", 6)):
        tiny_models.write_jsonl(tmp_path / name / "train.jsonl", rows[name][:train_rows])
        tiny_models.write_jsonl(tmp_path / name / "valid.jsonl", rows[name][-3:])
        assert run("precompute", "--model", tiny_model_dir, "--data", tmp_path / name, "--out", tmp_path / f"cache-{name}",
                   "--rows-per-shard", 3).exit_code == 0
        caches += ["--cache", tmp_path / f"cache-{name}"]
    args = [*caches, "--cache-weights", "0.7,0.3", "--model", tiny_model_dir, *TRAIN_ARGS, "--iters", 6]
    result = run("train", *args, "--output", tmp_path / "one", "--batch-size", 4)
    assert result.exit_code == 0, result.output
    output = launch("train", *args, "--output", tmp_path / "two", "--batch-size", 2)
    assert "Mixture of 2 caches: each epoch of 13 pairs draws 9 from" in output
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_numbers(one, two, "2 ranks")
    per_cache = [r.get("pairs_per_cache") for r in one]
    assert per_cache == [r.get("pairs_per_cache") for r in two]
    first_epoch = [p for r, p in zip(one, per_cache) if r["split"] == "train" and r["step"] <= 4]  # 4, 4, 4, 1 pairs
    a, b = str(tmp_path / "cache-a"), str(tmp_path / "cache-b")
    assert {key: sum(p[key] for p in first_epoch) for key in (a, b)} == {a: 9, b: 4}
    one_pairs, two_pairs = (pq.read_table(tmp_path / name / "eval_pairs.parquet").to_pandas() for name in ("one", "two"))
    assert one_pairs[["step", "cache", "index", "k"]].equals(two_pairs[["step", "cache", "index", "k"]])
    assert len(one_pairs) == 4 * 6 and set(one_pairs["cache"]) == {str(tmp_path / "cache-a"), str(tmp_path / "cache-b")}
    np.testing.assert_allclose(two_pairs["reward_margin"], one_pairs["reward_margin"], rtol=1e-4, atol=1e-5)


def cache_rows(cache: Path, split: str) -> list[dict]:
    manifest = json.loads((cache / "manifest.json").read_text())
    return [row for shard in manifest["splits"][split]["shards"] for row in pq.read_table(cache / shard["path"]).to_pylist()]


def float64_gradient(model_dir, cache: Path, adapters: dict, *, sft_weight: float, beta=0.1, lora_scale=20.0) -> np.ndarray:
    """The oracle: TRL's loss (sigmoid, plus sft_weight x sft: the chosen NLL per token) over every train pair of
    `cache` as one batch, by transformers' Llama in float64 with mlx-lm's LoRA layers where `adapters` has them
    (y + scale·(x·A)·B, A as given, B = 0); its gradient with respect to every B, flat, in sorted key order."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    lora_b = []
    for key in sorted(k for k in adapters if k.endswith(".lora_b")):
        layer = key.removesuffix(".lora_b")
        a = torch.tensor(np.asarray(adapters[layer + ".lora_a"]), dtype=torch.float64)
        lora_b.append(b := torch.zeros(adapters[key].shape, dtype=torch.float64, requires_grad=True))
        model.get_submodule(layer).register_forward_hook(lambda _, x, y, a=a, b=b: y + lora_scale * (x[0] @ a) @ b)
    pair_losses, nll, tokens = [], 0.0, 0
    for row in cache_rows(cache, "train"):
        logps = []
        for answer in (row["chosen_ids"], row["rejected_ids"]):  # K = 1: one list of ids
            logits = model(torch.tensor([row["prompt_ids"] + answer])).logits[0, len(row["prompt_ids"]) - 1 : -1]
            logps.append(torch.log_softmax(logits, dim=-1)[torch.arange(len(answer)), torch.tensor(answer)].sum())
        ratio = (logps[0] - row["ref_chosen_logps"]) - (logps[1] - row["ref_rejected_logps"])
        pair_losses.append(-torch.nn.functional.logsigmoid(beta * ratio))
        nll, tokens = nll - logps[0], tokens + len(row["chosen_ids"])
    (torch.stack(pair_losses).mean() + sft_weight * nll / tokens).backward()
    return np.concatenate([b.grad.numpy().ravel() for b in lora_b])


def step_gradient(run_dir: Path) -> tuple[np.ndarray, dict]:
    """Step 1's gradient of every LoRA B (flat, sorted key order) from a 1-step tests/sgd_train.py run, and
    its adapters."""
    import mlx.core as mx

    adapters = {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters.safetensors")).items()}
    return -np.concatenate([adapters[k].ravel() for k in sorted(adapters) if k.endswith(".lora_b")]), adapters


def test_uneven_ranks_step_the_float64_gradient(tiny_model_dir, seven_pairs, tmp_path, monkeypatch):
    """Step 1 over the 7 train pairs as one global batch of 8, its gradient read exactly after one SGD step
    (tests/sgd_train.py): 1 process x 8 pairs, and 2 ranks x 2 micro-batches of 2 (3 pairs on rank 0, 4 on
    rank 1), with the prompt laid out once per pair off and on, equal the float64 oracle's to float32 rounding:
    its largest difference, over the oracle's largest component, is under 1e-5. Measured (2026-11-30) 4-11e-7
    for every split: 1 x 8, 1 x 2 x 4 accumulated, 2 x 4, 2 x 2 x 2, 2 x 1 x 4 (a stand-in row), each layout.
    A weighting fault is far above: one pair weighted 1 + 1/7 gave 2.3e-2 (every run), each rank dividing by
    its own pair count x ranks 0.23, its own chosen-token count x ranks (the sft term) 0.22 (the 2-rank runs)."""
    import sgd_train
    from mlx_dpo.trainer import run as run_module

    args = ["--cache", seven_pairs, "--model", tiny_model_dir, "--iters", 1, "--max-grad-norm", 0,
            "--loss-type", "sigmoid,sft", "--loss-weights", "1,0.5"]
    monkeypatch.setattr(run_module, "build_optimizer", sgd_train.sgd)
    result = run("train", *args, "--output", tmp_path / "one", "--batch-size", 8, "--prompt-once", "off")
    assert result.exit_code == 0, result.output
    for layout in ("off", "on"):
        output = launch(*args, "--output", tmp_path / f"two-{layout}", "--batch-size", 2, "--grad-accumulation-steps", 2,
                        "--prompt-once", layout, program=(sys.executable, Path(sgd_train.__file__)))
        assert "Global batch 2 x 2 ranks x 2 micro-batches = 8 pairs per step" in output, output
        assert f"Prompt once per pair: {layout}" in output, output
    one, adapters = step_gradient(tmp_path / "one")
    oracle = float64_gradient(tiny_model_dir, seven_pairs, adapters, sft_weight=0.5)
    errors = {}
    for name in ("one", "two-off", "two-on"):
        gradient, theirs = step_gradient(tmp_path / name)
        assert all(np.array_equal(theirs[k], adapters[k]) for k in adapters if k.endswith(".lora_a"))  # same start
        errors[name] = np.abs(gradient - oracle).max() / np.abs(oracle).max()
    assert all(error < 1e-5 for error in errors.values()), errors
