"""Break of issue 14 item 2 (mixtures): the same cache given twice under two spellings.

Stated (mix README and TrainConfig): `--cache A --cache A` is refused ("--cache A is given twice; to draw
more of it, use --cache-weights"); "Evaluation scores the valid splits of all caches, one after the
other, each pair once".

What happens: the check compares the strings as typed, so `--cache A --cache ./A/` (the same directory,
the same identity) trains: "Mixture of 2 caches: each epoch of 24 pairs draws 12 from A (of its 12), 12
from ./A/ (of its 12)", every train row twice per epoch, and every held-out pair is scored twice
("eval on 8 of 8 pairs of the valid splits of 2 caches" for a 4-pair valid split), so eval_pairs.parquet
holds each pair twice per step. Expected: the same refusal as for `--cache A --cache A`.
"""

import tiny_models


def test_the_same_cache_under_another_spelling_is_refused_like_a_repeated_one(tiny_model_dir, tmp_path, monkeypatch):
    run = tiny_models.run_cli
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    tiny_models.write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:4])
    run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", tmp_path / "a")
    monkeypatch.chdir(tmp_path)
    args = ["--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 1, "--batch-size", 2]
    same = run("train", "--cache", "a", "--cache", "a", *args, ok=False)
    assert same.exit_code == 1 and "is given twice" in same.output, same.output
    spelled = run("train", "--cache", "a", "--cache", "./a/", *args, ok=False)
    assert spelled.exit_code == 1 and "given twice" in spelled.output, spelled.output
