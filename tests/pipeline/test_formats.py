"""Row formats: implicit prompt, system column, renamed columns, K rejected, valid fraction."""

import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlx_dpo.cli import cli
from mlx_dpo.pipeline.encode import RowRejected
from mlx_dpo.pipeline.formats import Fields, common_prefix, normalize

USER = {"role": "user", "content": "What color is the sky?"}


def test_implicit_prompt_text_keeps_the_space_with_the_answer():
    assert common_prefix("Q: sky? It is blue.", "Q: sky? It is green.") == ("Q: sky? It is", " blue.", " green.")


def test_implicit_prompt_conversational():
    chosen = [USER, {"role": "assistant", "content": "Blue."}]
    rejected = [USER, {"role": "assistant", "content": "Green."}]
    row = normalize({"chosen": chosen, "rejected": rejected}, Fields())
    assert row == {"prompt": [USER], "chosen": chosen[1:], "rejected": rejected[1:]}


def test_system_column():
    conversational = normalize({"prompt": [USER], "chosen": [], "rejected": [], "system": "Be brief."}, Fields())
    assert conversational["prompt"] == [{"role": "system", "content": "Be brief."}, USER]
    text = normalize({"prompt": "Q?", "chosen": "a", "rejected": "b", "system": "Be brief."}, Fields())
    assert text["prompt"] == "Be brief.\n\nQ?"


def test_renamed_columns_and_several_rejected():
    fields = Fields(prompt="question", chosen="good", rejected="bad")
    row = normalize({"question": "Q?", "good": " yes", "bad": [" no", " maybe"]}, fields)
    assert row == {"prompt": "Q?", "chosen": " yes", "rejected": [" no", " maybe"]}


def test_implicit_prompt_with_several_rejected_is_refused():
    with pytest.raises(RowRejected, match="exactly one rejected"):
        normalize({"chosen": "a b", "rejected": ["a c", "a d"]}, Fields())


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_renamed_columns_and_implicit_prompt_end_to_end(tiny_model_dir, tmp_path):
    rows = [{"good": f"Question {i}? The answer is yes.", "bad": f"Question {i}? The answer is no."} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "c",
                 "--chosen-field", "good", "--rejected-field", "bad", "--valid-fraction", "0.34")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_cached"] == 4 and manifest["splits"]["valid"]["rows_cached"] == 2
    indices = {split: pq.read_table(tmp_path / "c" / split / "part-00000.parquet")["index"].to_pylist()
               for split in ("train", "valid")}
    assert sorted(indices["train"] + indices["valid"]) == list(range(6))  # original positions, disjoint
    result = run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "d.jsonl", "--out", tmp_path / "c2",
                 "--chosen-field", "good", "--rejected-field", "bad", "--valid-fraction", "0.34")
    assert pq.read_table(tmp_path / "c2" / "valid" / "part-00000.parquet")["index"].to_pylist() == indices["valid"]
