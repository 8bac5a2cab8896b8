"""Break test for issue #12's real example (examples/smollm2-135m): a held-out split of other questions."""

import json

from mlx_dpo.smollm2 import write_arithmetic_data


def test_held_out_questions_were_never_seen_in_training(tmp_path):
    """Stated (issue #12: "with a held-out split of other questions"; examples/smollm2-135m/README.md:
    "Train rows use operands 2-49, the 32 held-out rows 50-99, so the held-out questions were never seen
    in training"; smollm2.write_arithmetic_data: "questions never seen in training"). Happens:
    multiplication draws both factors from 2-12 in both splits, so 6 of the 32 held-out questions are
    questions the training rows ask or solve: 'What is 2 * 10?', 'What is 12 * 3?', 'What is 11 * 8?',
    'What is 5 * 10?', 'What is 3 * 3?', 'What is 5 * 11?' (two of them among the 8 greedy answers the
    README shows), so the held-out accuracy is partly measured on training questions."""
    data = write_arithmetic_data(tmp_path / "arithmetic")

    def rows(name):
        return [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]

    seen = {m["content"] for row in rows("train") for m in row["prompt"] if m["role"] == "user"}
    asked = [row["prompt"][-1]["content"] for row in rows("valid")]
    leaked = [q for q in asked if q in seen]
    assert not leaked, f"{len(leaked)} of {len(asked)} held-out questions are in training rows: {leaked}"
