"""Break of issue 14 item 1 (row-level reuse) with `precompute --out SAME --overwrite`.

Stated (issue 14 item 1, README "Change the data without paying twice"): precompute reuses the
reference values of every row that an existing cache already scored with the same reference; the
sources are every complete cache under --out's parent folder (what `cache ls` lists there). The
issue's own example is "add 200 rows to a 10,000-row file": the natural way to rebuild is in place.

What happens: with --overwrite the existing cache at --out (a complete cache of the same reference,
listed by `cache ls` of the parent folder, holding every old row) is cleared before the reuse step and
is also excluded from the parent scan, so every row runs through the model again:
"train: 15 rows: 15 cached, 0 rejected" instead of "12 reused from ..., 3 computed"
(a sibling --out reuses the 12, as the control in the test shows).
"""

import json
import shutil

import tiny_models

NEW_ROWS = [
    {"prompt": "Name a colour:", "chosen": " blue.", "rejected": " seven."},
    {"prompt": "Two and three make", "chosen": " five.", "rejected": " a tree."},
    {"prompt": "Say hello.", "chosen": " Hello!", "rejected": " No."},
]


def test_rebuilding_in_place_with_overwrite_reuses_the_old_rows(tiny_model_dir, tmp_path):
    run = tiny_models.run_cli
    data = tiny_models.write_jsonl(tmp_path / "data.jsonl", tiny_models.standard_rows())
    out = tmp_path / "caches" / "main"
    run("precompute", "--model", tiny_model_dir, "--data", data, "--out", out)
    cached = json.loads((out / "manifest.json").read_text())["splits"]["train"]["rows_cached"]
    listed = run("cache", "ls", tmp_path / "caches").output
    assert str(out) in listed or "main" in listed  # the old cache is what `cache ls` lists there

    more = tiny_models.write_jsonl(tmp_path / "more.jsonl", tiny_models.standard_rows() + NEW_ROWS)
    control = run("precompute", "--model", tiny_model_dir, "--data", more, "--out", tmp_path / "caches" / "sibling").output
    assert f"{cached} reused from {out}, 3 computed" in control, control
    shutil.rmtree(tmp_path / "caches" / "sibling")  # only the old cache at --out is left to reuse
    output = run("precompute", "--model", tiny_model_dir, "--data", more, "--out", out,
                 "--overwrite").output
    assert f"{cached} reused from" in output and "3 computed" in output, output
