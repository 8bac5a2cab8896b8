"""The JSON-text copies of a folder's files (jsontext.json_text_copies) are one per file: named by the
whole file name, so train.json and train.jsonl keep apart. Review break7: named with the suffix
replaced, they shared one copy, one file's rows read twice and the other's never (6 rows from 5)."""

import json

import pyarrow.parquet as pq

import tiny_models


def _row(n):
    return {"prompt": [{"role": "user", "content": f"question {n}?"}],
            "chosen": [{"role": "assistant", "content": f"good answer {n}"}],
            "rejected": [{"role": "assistant", "content": f"bad answer {n}"}]}


def _prompt_key(row):
    return tuple(row["prompt_ids"])


def test_a_folder_with_train_json_and_train_jsonl_caches_every_row(tiny_model_dir, tmp_path):
    """README: nothing lost: every input row is cached or in rejects with its reason."""
    data = tmp_path / "data"
    data.mkdir()
    tiny_models.write_jsonl(data / "train.jsonl", [_row(0), _row(1)])
    (data / "train.json").write_text(json.dumps([_row(2), _row(3), _row(4)]))
    out = tmp_path / "c"
    result = tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out,
                                 "--max-length", "256", ok=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [r for s in manifest["splits"]["train"]["shards"] for r in pq.read_table(out / s["path"]).to_pylist()]
    split = manifest["splits"]["train"]
    prompts = sorted(_prompt_key(r) for r in rows)
    assert (split["rows_in"], len(rows) + split["rows_rejected"]) == (5, 5), split
    assert len(set(prompts)) == 5, prompts
