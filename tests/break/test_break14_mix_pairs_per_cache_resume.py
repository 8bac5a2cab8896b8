"""Break of issue 14 item 2 (mixtures): pairs_per_cache after --resume.

Stated (issue 14 item 2): "--resume and data parallel stay exact; each train line of metrics.jsonl
carries pairs_per_cache (each cache's path -> pairs since the last report)"; README (mixtures): tests
check "pairs_per_cache adding up to the pairs trained" and "a stopped and --resume'd run equal to an
uninterrupted one".

What happens: when the checkpoint is not on a report step (saves every 2 steps, reports every 4, the
run stopped or killed after step 2), the resumed run's step-4 line counts only steps 3-4: the pairs of
step 2 are in no line. Tiny model, A 6 rows, B 6 rows, weights 0.5,0.5: uninterrupted, step 4
{a: 4, b: 2}; stopped at 2 and resumed, step 4 {a: 2, b: 2} (16 pairs trained, the lines add up to 14;
on the demo caches likewise {A: 4, B: 2} vs {A: 3, B: 1}). The main README documents that averaged lines differ when
saves do not fall on report steps; a count of pairs "since the last report" has no such excuse.
"""

import json

import tiny_models

ARGS = ["--iters", 8, "--batch-size", 2, "--steps-per-report", 4, "--steps-per-save", 2, "--steps-per-eval", 100,
        "--cache-weights", "0.5,0.5"]


def train_lines(run_dir):
    return [r for r in map(json.loads, open(run_dir / "metrics.jsonl")) if r["split"] == "train"]


def test_pairs_per_cache_after_resume_add_up_and_equal_an_uninterrupted_run(tiny_model_dir, tmp_path):
    run = tiny_models.run_cli
    rows = tiny_models.standard_rows()
    for name, part in (("a", rows[:6]), ("b", rows[6:])):
        data = tiny_models.write_jsonl(tmp_path / f"{name}.jsonl", part)
        run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / name, "--no-reuse")
    caches = ["--cache", tmp_path / "a", "--cache", tmp_path / "b", "--model", tiny_model_dir]
    run("train", *caches, "--output", tmp_path / "whole", *ARGS)
    run("train", *caches, "--output", tmp_path / "resumed", *ARGS, "--stop-after", 2)
    run("train", *caches, "--output", tmp_path / "resumed", *ARGS, "--resume")
    whole, resumed = train_lines(tmp_path / "whole"), train_lines(tmp_path / "resumed")
    trained = 8 * 2
    assert sum(sum(r["pairs_per_cache"].values()) for r in whole) == trained
    assert [r["pairs_per_cache"] for r in resumed] == [r["pairs_per_cache"] for r in whole], (whole, resumed)
    assert sum(sum(r["pairs_per_cache"].values()) for r in resumed) == trained
