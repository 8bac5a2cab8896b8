"""Step 1 on long answers: how far from ln 2 the float32 rounding of long sums takes it (README, Quickstart).

The cache's reference pass and the trainer's policy pass score the same tokens with the same function but
in other layouts (widths, batchmates), so a sequence's float32 sum of a few hundred log-probs (near -300
nats, 1 ulp ~3e-5) can differ by some ulps between them. Found by a review (break14): a one-row file with
300-800-token sequences gave step-1 loss 0.6931289, 1.8e-5 from ln 2, on main at 86104c0 as since.
"""

import json
import math
import random

import tiny_models


def long_rows(count: int) -> list[dict]:
    """Rows of 100-400 words per answer (sequences of 300-800 tokens of the tiny model)."""
    rng = random.Random(0)
    words = "the cat sat on a mat and dog ran to red blue sky sun moon star tree".split()
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
        chosen, rejected = (" " + " ".join(rng.choice(words) for _ in range(rng.randint(100, 400))) for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def test_step1_on_long_answers_is_ln2_within_the_rounding_of_long_sums(tiny_model_dir, tmp_path):
    data = tiny_models.write_jsonl(tmp_path / "long.jsonl", long_rows(2)[1:])
    tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "cache",
                        "--max-length", 1024)
    tiny_models.run_cli("train", "--cache", tmp_path / "cache", "--model", tiny_model_dir, "--output",
                        tmp_path / "run", "--iters", 1, "--batch-size", 1, "--steps-per-report", 1,
                        "--steps-per-eval", 1000, "--steps-per-save", 1000)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first = next(m for m in lines if m.get("split") == "train")
    # beta 0.1: the loss moves by beta/2 x the margin's error; 1e-4 allows margins off by 2e-3 nats,
    # ~60 ulp of these sums (measured: 1.8e-5 off, README Quickstart).
    print("step-1 loss - ln 2:", first["loss"] - math.log(2))
    assert abs(first["loss"] - math.log(2)) <= 1e-4, first
