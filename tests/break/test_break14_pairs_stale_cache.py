"""Break of issue 14 item 3 (`report RUN --pairs` / `--samples`) after the run's cache path is rebuilt.

Stated (issue 14 item 3, README "What training did to each pair"): `report RUN --pairs` prints the
most-improved and most-worsened pairs "with their decoded prompt and answers"; "the pairs are decoded
from the cache with the tokenizer of the run's model". The run's config.yaml records the identity of the
cache it trained on.

What happens: report decodes eval_pairs.parquet's `index` values from whatever cache now sits at the
run's cache path, without comparing its identity with the run's. Iterating on data (issue 14's very
use case) by rebuilding the cache in place (`precompute --out SAME --overwrite`, here with the held-out
rows in another order) makes the same run's report print other pairs' prompts and answers beside the
evaluated pair's numbers, silently and with exit 0. Expected: the same text as before the rebuild, or
the numbers with "answers not shown" naming the identity mismatch.
"""

import tiny_models

ARGS = ["--iters", 2, "--batch-size", 3, "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-eval", 2,
        "--steps-per-save", 2, "--eval-generate", 2, "--eval-max-tokens", 4]


def text_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip().startswith(("prompt", "chosen", "rejected"))]


def test_report_pairs_does_not_decode_another_cache_than_the_run_trained_on(tiny_model_dir, tmp_path):
    run = tiny_models.run_cli
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    tiny_models.write_jsonl(tmp_path / "data" / "valid.jsonl", rows[3:9])
    cache = tmp_path / "caches" / "main"
    run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", cache)
    run("train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", *ARGS)
    before = run("report", tmp_path / "run", "--pairs", "--top", 2).output
    samples_before = run("report", tmp_path / "run", "--samples").output
    assert text_lines(before)

    # the next data iteration, rebuilt in place: the same held-out pairs, in reverse order
    tiny_models.write_jsonl(tmp_path / "data" / "valid.jsonl", rows[3:9][::-1])
    run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", cache, "--overwrite")
    after = run("report", tmp_path / "run", "--pairs", "--top", 2).output
    samples_after = run("report", tmp_path / "run", "--samples").output
    same_numbers = [line for line in before.splitlines() if "index" in line]
    assert same_numbers == [line for line in after.splitlines() if "index" in line]  # the run did not change
    assert text_lines(after) == text_lines(before) or "answers not shown" in after, (before, after)
    assert text_lines(samples_after) == text_lines(samples_before) or "not shown" in samples_after, \
        (samples_before, samples_after)
