"""CSV headers as datasets reads them: cells are read as text through a string schema whose column
names must be pandas' own (a UTF-8 byte-order mark stripped, blank lines before the header skipped, an
empty name read as "Unnamed: 0"), and a folder whose CSV files have other columns is refused, naming two
of them, not read through one file's schema. Found by review break7: each failed with the header read by
Python's csv (the first three refused, the folder dropped valid.csv's system column silently)."""

import json

import tiny_models


def test_a_csv_with_a_utf8_byte_order_mark_is_cached(tiny_model_dir, tmp_path):
    """README: data as .jsonl, .json, .parquet or .csv; CSV cells read as text as written."""
    data = tmp_path / "excel.csv"
    data.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\nWhat is 2+2?,4,5\nCapital of France?,Paris,Rome\n")
    result = tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c",
                                 "--max-length", "256", ok=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_cached"] == 2


def test_a_csv_whose_header_follows_a_blank_line_is_cached(tiny_model_dir, tmp_path):
    """Same sentence. pandas skips blank lines before the header; the string schema is named from
    Python csv's first row, [] for a blank line: "Instruction "train" corresponds to no data!" (cached
    2 rows on 69a8d36)."""
    data = tmp_path / "blank.csv"
    data.write_text("\nprompt,chosen,rejected\nWhat is 2+2?,4,5\nCapital of France?,Paris,Rome\n")
    result = tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c",
                                 "--max-length", "256", ok=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_cached"] == 2


def test_a_csv_written_by_pandas_with_its_index_is_cached(tiny_model_dir, tmp_path):
    """Same sentence. DataFrame.to_csv() writes its index under an empty header name; pandas reads it
    back as "Unnamed: 0", the string schema names it "" (Python csv): the file is refused."""
    data = tmp_path / "frame.csv"
    data.write_text(",prompt,chosen,rejected\n0,What is 2+2?,4,5\n1,Capital of France?,Paris,Rome\n")
    result = tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c",
                                 "--max-length", "256", ok=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_cached"] == 2


def test_a_column_only_the_valid_csv_has_is_not_dropped(tiny_model_dir, tmp_path):
    """README: "the data files of a folder need the same columns, of the same types" (refused, naming
    the files), and the system column (default `system`, if present) is read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nCapital of France?,Paris,Rome\n")
    (data / "valid.csv").write_text("prompt,chosen,rejected,system\nSky colour?,blue,green,Answer in French.\n")
    out = tmp_path / "c"
    result = tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out,
                                 "--max-length", "256", ok=False)
    assert result.exit_code != 0 and not (out / "manifest.json").exists()
    assert "train.csv and valid.csv have different columns (only valid.csv has system)" in result.output, result.output
