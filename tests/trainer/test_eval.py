"""Evaluation: the whole valid split or a fixed seeded sample of it (never its shortest pairs), bounded
memory, and a valid split without cached rows skips evaluation."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.trainer.stream import PairStream

run = tiny_models.invoke_cli


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(root / "data" / "train.jsonl", rows[:4])
    tiny_models.write_jsonl(root / "data" / "valid.jsonl", rows)
    assert run("precompute", "--model", tiny_model_dir, "--data", root / "data", "--out", root / "cache",
               "--rows-per-shard", 5).exit_code == 0
    return root / "cache"


def valid_rows(cache) -> list[dict]:
    """The valid split in file order (the positions a sample is drawn from)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    return [r for s in manifest["splits"]["valid"]["shards"] for r in pq.read_table(cache / s["path"]).to_pylist()]


def test_eval_is_a_fixed_sample_of_the_whole_split(cache, tiny_model_dir, tmp_path):
    """--val-batches 2 of 2 pairs: 4 of the 12 valid pairs. At step 0 the policy is the reference, so the
    eval's logps/chosen is the mean cached ref_chosen_logps of the pairs scored: not those of the 4
    shortest pairs, and (lr 1e-9: the policy hardly moves) the same sample at every evaluation."""
    result = run("train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 4,
                 "--batch-size", 2, "--val-batches", 2, "--steps-per-eval", 2, "--learning-rate", 1e-9)
    assert result.exit_code == 0, result.output
    evals = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["split"] == "eval"]
    assert len(evals) == 3
    assert all(r["logps/chosen"] == pytest.approx(evals[0]["logps/chosen"], abs=1e-4) for r in evals)
    rows = valid_rows(cache)
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    shortest = np.argsort(lengths, kind="stable")[:4]
    assert evals[0]["logps/chosen"] != pytest.approx(np.mean([rows[i]["ref_chosen_logps"] for i in shortest]), abs=1e-3)
    assert "eval on 4 of 12 pairs of the valid split (a fixed seeded sample" in result.output


def test_eval_scores_the_whole_split_by_default(cache, tiny_model_dir, tmp_path):
    result = run("train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 1,
                 "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "eval on 12 of 12 pairs of the valid split\n" in result.output
    first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    rows = valid_rows(cache)
    assert first["split"] == "eval"
    assert first["logps/chosen"] == pytest.approx(np.mean([r["ref_chosen_logps"] for r in rows]), abs=1e-4)


def test_unshuffled_stream_holds_one_buffer_at_a_time(cache):
    """Evaluation reads the split through buffers of --shuffle-buffer rows, sorted by length within each:
    a batch never mixes rows of two buffers, so memory does not grow with the split."""
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = [cache / s["path"] for s in manifest["splits"]["valid"]["shards"]]
    stream = PairStream(shards, batch_size=2, max_length=None, truncation_mode="keep_start", pad_id=0,
                        shuffle=False, shuffle_buffer=4, pad_to_multiple=1)
    position = {r["index"]: i for i, r in enumerate(valid_rows(cache))}
    batches = [[position[int(i)] for i in batch.indices] for [batch] in stream.epoch(0)]
    assert sorted(p for b in batches for p in b) == list(range(12))
    assert all(len({p // 4 for p in b}) == 1 for b in batches), batches


def test_a_valid_split_without_rows_skips_evaluation(cache, tiny_model_dir, tmp_path):
    """A manifest whose valid split holds no cached row (precompute refuses to write one; an edited or
    foreign manifest may): one note, no eval records, never `loss 0.0000 acc 0.000`."""
    import shutil

    edited = tmp_path / "cache"
    shutil.copytree(cache, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    valid = manifest["splits"]["valid"]
    for shard in valid["shards"]:
        (edited / shard["path"]).unlink()
    valid.update(rows_cached=0, rows_rejected=valid["rows_in"], shards=[])
    (edited / "manifest.json").write_text(json.dumps(manifest))
    result = run("train", "--cache", edited, "--model", tiny_model_dir, "--output", tmp_path / "run",
                 "--iters", 2, "--steps-per-eval", 1)
    assert result.exit_code == 0, result.output
    assert {json.loads(line)["split"] for line in open(tmp_path / "run" / "metrics.jsonl")} == {"train"}
    assert "[ eval]" not in result.output and "Held-out" not in result.output
    assert "the valid split has no cached rows; no evaluation" in result.output
