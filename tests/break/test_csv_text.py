"""Break: datasets reads a CSV file in chunks of 10,000 rows through pandas, each chunk typed on its
own: in a chunk whose answers all look like numbers the text "0.50" becomes the float 0.5, and the
cast to the string column of the first chunk writes it back as "0.5". The answer scored and trained
is then not the one in the file, with no error and no reject.

README: "A field whose JSON type changes between rows is refused too (...): `datasets` would turn it
into a column that silently re-reads the text `"4."` as the number 4.0"; Nothing is lost: "Every
input row is either in a shard or in `rejects.jsonl` with its reason" (the row cached is the input row).
"""

import csv
import json

import pyarrow.parquet as pq

from tiny_models import run_cli


def test_a_csv_answer_is_cached_as_written(tiny_model_dir, tmp_path):
    from mlx_dpo.models import load_tokenizer

    # 10,000 rows that are rejected before tokenization (cheap), then rows whose answers look like numbers
    rows = [{"prompt": f"Q{i}: a word?", "chosen": "same", "rejected": "same"} for i in range(10_000)]
    rows += [{"prompt": f"R{i}: one half, to two decimals?", "chosen": " 0.50", "rejected": " 0.5000001"}
             for i in range(3)]
    data = tmp_path / "prefs.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c", "--max-length", "64",
            "--rows-per-shard", 20_000)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    tokenizer = load_tokenizer(tiny_model_dir)
    chosen = tokenizer.decode(cached[0]["chosen_ids"], skip_special_tokens=True)
    assert chosen.strip() == "0.50", f"row {cached[0]['index']}: the file's chosen ' 0.50' was cached as {chosen!r}"
