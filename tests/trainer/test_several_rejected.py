"""One chosen, K rejected answers per prompt, end to end."""

import json
import math

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.schemas.identity import SEVERAL_REJECTED_RULES, TOKENIZATION_RULES

run = tiny_models.invoke_cli


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tmp_path_factory):
    """A K=2 cache, and a K=1 cache of the same rows split into their 2 pairs each."""
    root = tmp_path_factory.mktemp("several")
    base = tiny_models.standard_rows()[:8]
    several = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": [r["rejected"], r["rejected"] + " Maybe."]}
               for r in base]
    several.append({**several[0], "rejected": [base[0]["rejected"]]})  # K=1 row in a K=2 set: rejected
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": answer}
             for r in several[:8] for answer in r["rejected"]]
    tiny_models.write_jsonl(root / "several.jsonl", several)
    tiny_models.write_jsonl(root / "pairs.jsonl", pairs)
    for name in ("several", "pairs"):
        result = run("precompute", "--model", tiny_model_dir, "--data", root / f"{name}.jsonl", "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def test_cache_holds_k_values_equal_to_the_split_pairs(caches):
    manifest = json.loads((caches / "several" / "manifest.json").read_text())
    assert manifest["rejected_per_prompt"] == 2
    assert manifest["splits"]["train"]["rows_rejected"] == 1
    rejects = [json.loads(line) for line in open(caches / "several" / "rejects.jsonl")]
    assert rejects == [{"split": "train", "index": 8, "reason": "has 1 rejected answer(s) where this cache has 2 per prompt"}]
    several = pq.read_table(caches / "several" / "train" / "part-00000.parquet").to_pylist()
    pairs = pq.read_table(caches / "pairs" / "train" / "part-00000.parquet").to_pylist()
    for row in several:
        for k in range(2):
            pair = pairs[2 * row["index"] + k]
            assert row["rejected_ids"][k] == pair["rejected_ids"] and row["chosen_ids"] == pair["chosen_ids"]
            assert row["ref_rejected_logps"][k] == pytest.approx(pair["ref_rejected_logps"], abs=1e-4)
            assert row["ref_chosen_logps"] == pytest.approx(pair["ref_chosen_logps"], abs=1e-4)


@pytest.mark.parametrize("aggregation, step0", [("pairwise", math.log(2)), ("softmax", math.log(3))])
def test_trains_with_both_aggregations(caches, tiny_model_dir, aggregation, step0):
    """At step 0 every h_j equals h_w: pairwise gives ln 2; Plackett-Luce gives ln(1 + 2e^0) = ln 3."""
    out = caches / f"run-{aggregation}"
    result = run("train", "--cache", caches / "several", "--model", tiny_model_dir, "--output", out, "--iters", 3,
                 "--batch-size", 4, "--steps-per-report", 1, "--learning-rate", 1e-3,
                 "--rejected-aggregation", aggregation)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert records[0]["loss"] == pytest.approx(step0, abs=1e-4)
    assert abs(records[0]["rewards/margins"]) < 1e-4
    assert all(math.isfinite(r["loss"]) for r in records) and len(records) == 3


MERGING = {"prompt": "The capital of Fra", "chosen": " Paris is the capital.", "rejected": ["nce is Berlin.", " Rome."]}


def _rows(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = [r for s in manifest["splits"]["train"]["shards"] for r in pq.read_table(cache / s["path"]).to_pylist()]
    return sorted(rows, key=lambda r: r["index"])


def test_comparison_k_of_a_row_is_the_kth_split_pair(tiny_model_dir, tmp_path):
    """README (Several rejected answers per prompt): `pairwise` is "the mean over the K (chosen, rejected)
    pairs, identical to splitting the row into K pairs: a test checks it". A row stores one prompt and
    one chosen answer, so where the pairs would split the prompt at different tokens (one rejected answer
    merges with the prompt's end: "Fra" + "nce", the others do not) comparison k could not be the k-th
    pair (chosen logps, lengths, rewards/chosen, the NLL and length-using losses would differ): that row
    is rejected with its reason and counted. Rows whose pairs agree (the chosen answer merging, or none)
    are cached, each comparison exactly its split pair."""
    rows = [MERGING,
            {**MERGING, "chosen": "nce: Paris.", "rejected": [" Berlin.", " Rome."]},  # the chosen merges: all pairs alike
            {**MERGING, "prompt": "Hi", "rejected": [" no.", " nope."]}]
    tiny_models.write_jsonl(tmp_path / "several.jsonl", rows)
    tiny_models.write_jsonl(tmp_path / "pairs.jsonl", [{**r, "rejected": a} for r in rows for a in r["rejected"]])
    for name in ("several", "pairs"):
        tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", tmp_path / f"{name}.jsonl",
                            "--out", tmp_path / name, "--max-length", "64")
    several, pairs = _rows(tmp_path / "several"), _rows(tmp_path / "pairs")
    assert pairs[0]["prompt_ids"] != pairs[1]["prompt_ids"]  # the premise: row 0's pairs split the prompt apart
    assert pairs[2]["prompt_ids"] == pairs[3]["prompt_ids"] != pairs[1]["prompt_ids"]  # row 1's agree, inside it

    manifest = json.loads((tmp_path / "several" / "manifest.json").read_text())
    rejects = [json.loads(line) for line in open(tmp_path / "several" / "rejects.jsonl")]
    assert manifest["splits"]["train"]["rows_rejected"] == 1 and [r["index"] for r in rejects] == [0]
    assert "rejected answer(s) 1 (of 2)" in rejects[0]["reason"] and "separate pairs" in rejects[0]["reason"]
    assert [r["index"] for r in several] == [1, 2]
    # so a K cache made before this rule (the row cached) is not reused; caches of single answers keep theirs
    pairs_manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert (manifest["identity_fields"]["tokenization_rules"], pairs_manifest["identity_fields"]["tokenization_rules"]) \
        == (SEVERAL_REJECTED_RULES, TOKENIZATION_RULES) and SEVERAL_REJECTED_RULES != TOKENIZATION_RULES
    for row in several:
        for k in range(2):
            pair = pairs[2 * row["index"] + k]
            assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"][k]) == \
                (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]), f"row {row['index']} comparison {k}"
            # what length-normalised losses (ipo, sigmoid_norm, simpo), c/r-separate ones, the NLL and rewards/chosen read
            assert row["n_chosen_tokens"] == pair["n_chosen_tokens"]
            assert row["n_rejected_tokens"][k] == pair["n_rejected_tokens"]
            assert row["ref_chosen_logps"] == pytest.approx(pair["ref_chosen_logps"], abs=1e-5)
            assert row["ref_rejected_logps"][k] == pytest.approx(pair["ref_rejected_logps"], abs=1e-5)
