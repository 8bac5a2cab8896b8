"""Write trl-lib/ultrafeedback_binarized as mlx-dpo conversational data: OUT/train.jsonl, OUT/valid.jsonl.

The hub rows hold whole conversations in `chosen` and `rejected` (the user turn, then the answer), with
no `prompt` column; the shared turns become the prompt and the last turn of each the completion.
Usage: python prepare_data.py data/ultrafeedback  (needs a network, and `datasets`)
"""

import json
import sys
from pathlib import Path


def split_last_turn(row: dict) -> dict:
    """{"chosen": [user, assistant], "rejected": [user, assistant']} -> {"prompt": [user], "chosen":
    [assistant], "rejected": [assistant']}; refuses rows whose conversations differ before the answer."""
    prompt = row["chosen"][:-1]
    if not prompt or row["rejected"][:-1] != prompt:
        raise ValueError("chosen and rejected do not share the turns before their last message")
    return {"prompt": prompt, "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


def main(out: str) -> None:
    import datasets

    splits = datasets.load_dataset("trl-lib/ultrafeedback_binarized")
    Path(out).mkdir(parents=True, exist_ok=True)
    for hub_split, name in (("train", "train"), ("test", "valid")):
        with open(Path(out) / f"{name}.jsonl", "w") as handle:
            for row in splits[hub_split]:
                handle.write(json.dumps(split_last_turn(row), ensure_ascii=False) + "\n")
        print(f"{out}/{name}.jsonl: {len(splits[hub_split]):,} rows")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/ultrafeedback")
