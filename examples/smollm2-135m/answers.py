"""Greedy answers of SmolLM2 (optionally with a run's adapters) to the first held-out questions.

    python examples/smollm2-135m/answers.py MODEL VALID_JSONL [--adapter-path RUN] [--count 6]

Loads exactly as `mlx_lm.generate --model MODEL --adapter-path RUN` does; prints one line per
question, and how many of them the model answers right.
"""

import argparse
import json
import re

import mlx_lm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("valid")
    parser.add_argument("--adapter-path")
    parser.add_argument("--count", type=int, default=6)
    args = parser.parse_args()
    model, tokenizer = mlx_lm.load(args.model, adapter_path=args.adapter_path)
    rows = [json.loads(line) for line in open(args.valid)][: args.count]
    right = 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24).strip()
        expected = row["chosen"][0]["content"]
        ok = re.sub(r"\s", "", answer).startswith(re.sub(r"\s", "", expected).rstrip("."))
        right += ok
        print(f"{'ok ' if ok else '   '} {row['prompt'][-1]['content']:<20} -> {answer!r}")
    print(f"{right} of {len(rows)} right")


if __name__ == "__main__":
    main()
