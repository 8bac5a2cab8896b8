"""The SmolLM2 example's generated preference set (mlx_dpo.smollm2; no model needed)."""

import json

from mlx_dpo.smollm2 import write_arithmetic_data


def test_held_out_questions_were_never_seen_in_training(tmp_path):
    """No held-out row shows or asks a question that a training row shows or asks, in either order
    ("3 * 11" is "11 * 3"). Multiplication draws factors below 13 in both splits, so 6 of the 32
    held-out questions were training questions ('What is 2 * 10?', 'What is 12 * 3?', ...)."""
    data = write_arithmetic_data(tmp_path / "arithmetic")

    def questions(name):
        rows = [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]
        asked = [m["content"].removeprefix("What is ").removesuffix("?").split()
                 for row in rows for m in row["prompt"] if m["role"] == "user"]
        return {(op, *sorted((a, b))) if op in "+*" else (a, op, b) for a, op, b in asked}, len(rows)

    (train, n_train), (valid, n_valid) = questions("train"), questions("valid")
    assert (n_train, n_valid) == (96, 32)
    assert not train & valid, sorted(train & valid)
    assert any(op == "*" for op, *_ in valid)  # held-out products remain, other than the trained ones
