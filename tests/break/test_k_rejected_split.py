"""Break: with K rejected answers, the completion of every answer starts at the shortest common prefix
over all K+1 sequences (encode.encode_row), so where one rejected answer merges tokens across the
prompt's end ("Fra" + "nce") and the others do not, the chosen answer and the other rejected answers
are scored from inside the prompt too. Split into K pairs (what TRL trains, each pair with its own
boundary) they are not: comparison k of the row is not the k-th pair. (The extra tokens are the same
prompt tokens in the same context in both sequences, so they cancel in the margin c - r: the sigmoid
loss is unchanged; rewards/chosen, logps/*, the NLL and every loss that reads c, r or |y| apart differ.)

README (Several rejected answers per prompt): "`pairwise` (default: the mean over the K (chosen,
rejected) pairs, identical to splitting the row into K pairs: a test checks it)".
"""

import json

import pyarrow.parquet as pq

from tiny_models import run_cli, write_jsonl

ROW = {"prompt": "The capital of Fra", "chosen": " Paris is the capital.", "rejected": ["nce is Berlin.", " Rome."]}


def _rows(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = [r for s in manifest["splits"]["train"]["shards"] for r in pq.read_table(cache / s["path"]).to_pylist()]
    return sorted(rows, key=lambda r: r["index"])


def test_comparison_k_of_a_row_is_the_kth_split_pair(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "several.jsonl", [ROW, {**ROW, "prompt": "Hi", "rejected": [" no.", " nope."]}])
    write_jsonl(tmp_path / "pairs.jsonl", [{**ROW, "rejected": answer} for answer in ROW["rejected"]])
    for name in ("several", "pairs"):
        run_cli("precompute", "--model", tiny_model_dir, "--data", tmp_path / f"{name}.jsonl", "--out", tmp_path / name,
                "--max-length", "64")
    row, pairs = _rows(tmp_path / "several")[0], _rows(tmp_path / "pairs")
    assert pairs[0]["prompt_ids"] != pairs[1]["prompt_ids"]  # the premise: the two pairs split the prompt apart
    for k, pair in enumerate(pairs):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"][k]) == \
            (pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]), f"comparison {k}"
        # what length-normalised losses (ipo, sigmoid_norm, simpo), c/r-separate ones (nca_pair, bco_pair,
        # apo_*, sppo_hard), the NLL per token and rewards/chosen read
        assert (row["n_chosen_tokens"], row["ref_chosen_logps"]) == (pair["n_chosen_tokens"], pair["ref_chosen_logps"])
