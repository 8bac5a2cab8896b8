"""Bad input to `precompute`: file-level problems are one line naming file, line and field; bad
rows are skipped into rejects.jsonl with their reason (or fail the run with --strict)."""

import json
import shutil

import pytest

import tiny_models

GOOD = {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " four.", "rejected": " five."}


run = tiny_models.invoke_cli


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def one_line_error(result, expected):
    assert result.exit_code == 1, result.output
    assert expected in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


GOOD_LINE = json.dumps(GOOD) + "\n"


@pytest.mark.parametrize("name, content, expected", [
    ("bad.jsonl", GOOD_LINE + '{"prompt": "a", "chosen": "b" "rejected": "c"}\n',
     "bad.jsonl: line 2: invalid JSON (Expecting ',' delimiter at column 31)"),
    ("latin1.jsonl", (GOOD_LINE + GOOD_LINE.replace("two", "tw\xf6")).encode("latin-1"),
     "latin1.jsonl: line 2: not UTF-8 (byte 0xf6 at column 33)"),
    ("empty.jsonl", "\n\n", "empty.jsonl: no rows (the file is empty)"),
    ("array.jsonl", GOOD_LINE * 3 + "[1, 2]\n", "array.jsonl: line 4: expected a JSON object, got an array"),
    ("mixed.jsonl", GOOD_LINE + json.dumps({**GOOD, "chosen": 4}) + "\n",
     "mixed.jsonl: line 2: field 'chosen' is a number, but line 1 has a string there"),
    ("nested.jsonl", '{"prompt": [{"role": "user", "content": "2+2?"}]}\n{"prompt": [{"role": "user", "content": 4}]}\n',
     "nested.jsonl: line 2: field 'prompt[].content' is a number, but line 1 has a string there"),
    ("bad.json", '[\n  {"prompt": "a",\n   "chosen": }\n]', "bad.json: line 3: invalid JSON (Expecting value at column 14)"),
    ("latin1.csv", b"prompt,chosen,rejected\nq,caf\xe9,tea\n", "latin1.csv: line 2: not UTF-8 (byte 0xe9 at column 6)"),
    ("broken.parquet", b"PAR1 this is not parquet", "broken.parquet: could not read the data"),
])
def test_unreadable_data_files(tiny_model_dir, tmp_path, name, content, expected):
    data = write(tmp_path / name, content)
    one_line_error(run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "out"), expected)


def test_a_bad_file_in_a_data_folder_is_named(tiny_model_dir, tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.jsonl", GOOD_LINE)
    write(tmp_path / "data" / "valid.jsonl", "{oops\n")
    result = run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", tmp_path / "out")
    one_line_error(result, f"{tmp_path / 'data' / 'valid.jsonl'}: line 1: invalid JSON")


@pytest.mark.parametrize("train, valid, expected", [
    ({"chosen": "The answer is four.", "rejected": "The answer is five."}, {"prompt": "2+2?", **GOOD},
     "train.jsonl and valid.jsonl have different columns (only valid.jsonl has prompt)"),
    (GOOD, {"prompt": "2+2?", "chosen": [{"role": "assistant", "content": "4"}], "rejected": " five."},
     "train.jsonl and valid.jsonl have different column types (chosen: string in train.jsonl, list in valid.jsonl)"),
])
def test_split_files_that_disagree_are_named_in_one_line(tiny_model_dir, tmp_path, train, valid, expected):
    """datasets refuses such a folder with a many-line cast error naming neither file."""
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "train.jsonl", json.dumps(train) + "\n")
    write(tmp_path / "data" / "valid.jsonl", json.dumps(valid) + "\n")
    result = run("precompute", "--model", tiny_model_dir, "--data", tmp_path / "data", "--out", tmp_path / "out")
    one_line_error(result, f"{tmp_path / 'data'}: {expected}; the data files of a folder need the same columns")


@pytest.mark.parametrize("remove, expected", [
    (["tokenizer.json", "tokenizer_config.json"], "no tokenizer (none of tokenizer.json"),
    (["model.safetensors"], "no model*.safetensors weights (only safetensors are loaded, never pickle)"),
])
def test_incomplete_model_directories(tiny_model_dir, standard_data, tmp_path, remove, expected):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for name in remove:
        (model / name).unlink()
    result = run("precompute", "--model", model, "--data", standard_data, "--out", tmp_path / "out")
    one_line_error(result, f"{model}: {expected}")


@pytest.mark.parametrize("flags, expected", [
    ([], "custom module ('custom.py')"),  # refused: the code never ran
    (["--trust-remote-code"], "could not load the model (RuntimeError: custom model code ran)"),
])
def test_model_code_runs_only_when_trusted(tiny_model_dir, standard_data, tmp_path, flags, expected):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "custom.py").write_text("raise RuntimeError('custom model code ran')\n")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_file": "custom.py"}))
    result = run("precompute", "--model", model, "--data", standard_data, "--out", tmp_path / "out", *flags)
    one_line_error(result, expected)


BAD_ROWS = [  # (row, reason recorded in rejects.jsonl)
    ({**GOOD, "chosen": ""}, "empty chosen"),
    ({**GOOD, "chosen": "   "}, "empty chosen"),
    ({**GOOD, "rejected": None}, "rejected is NoneType, not a string or message list"),
    ({**GOOD, "chosen": None}, "chosen is NoneType, not a string or message list"),
    ({**GOOD, "rejected": GOOD["chosen"]}, "chosen identical to rejected"),
    ({**GOOD, "prompt": "word " * 40}, "prompt fills max_length"),
]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    rows = [GOOD, {**GOOD, "chosen": " 4."}] + [row for row, _ in BAD_ROWS] + [{**GOOD, "rejected": " 22."}]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_bad_rows_are_rejected_with_their_reason_and_counted(tiny_model_dir, mixed_data, tmp_path):
    out = tmp_path / "cache"
    result = run("precompute", "--model", tiny_model_dir, "--data", mixed_data, "--out", out, "--max-length", 32)
    assert result.exit_code == 0, result.output
    assert ("train: 9 rows: 3 cached, 6 rejected: 2 empty chosen, 1 chosen identical to rejected, "
            "1 chosen is NoneType, not a string or message list, 1 prompt fills max_length") in result.output
    rejects = [json.loads(line) for line in open(out / "rejects.jsonl")]
    assert [(r["index"], r["reason"].split(" (")[0]) for r in rejects] == [
        (i + 2, reason) for i, (_, reason) in enumerate(BAD_ROWS)]
    train = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert train["rows_in"] == 9 == train["rows_cached"] + train["rows_rejected"]
    assert train["rejected_by_reason"]["empty chosen"] == 2
    assert run("cache", "verify", out).exit_code == 0


def test_strict_turns_a_rejected_row_into_an_error(tiny_model_dir, mixed_data, tmp_path):
    result = run("precompute", "--model", tiny_model_dir, "--data", mixed_data, "--out", tmp_path / "cache",
                 "--max-length", 32, "--strict")
    one_line_error(result, f"{mixed_data} [train] row 2: empty chosen (--strict: 6 of 9 rows would be rejected: "
                           "2 empty chosen, 1 chosen identical")
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_non_finite_reference_log_probs_stop_precompute(tiny_model_dir, standard_data, tmp_path):
    import mlx.core as mx

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, model)
    weights = mx.load(str(model / "model.safetensors"))
    weights["lm_head.weight"] = mx.where(mx.arange(weights["lm_head.weight"].shape[0])[:, None] == 5,
                                         mx.array(float("nan")), weights["lm_head.weight"])
    mx.save_safetensors(str(model / "model.safetensors"), weights)
    result = run("precompute", "--model", model, "--data", standard_data, "--out", tmp_path / "cache")
    one_line_error(result, f"{model}: non-finite reference log-prob (ref_chosen_logps = nan) for train row ")
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not list((tmp_path / "cache").glob("*/part-*.parquet"))


def test_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "mlx_dpo", "cache", "verify", str(tmp_path)]
    quiet = subprocess.run(args, capture_output=True, text=True)
    loud = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert quiet.returncode == loud.returncode == 1
    assert "Traceback" not in quiet.stderr and quiet.stderr.startswith("Error: ")
    assert "Traceback (most recent call last)" in loud.stderr and loud.stderr.strip().endswith(quiet.stderr.strip())


def test_precompute_never_writes_through_a_link_in_the_cache(tiny_model_dir, standard_data, tmp_path):
    out, target = tmp_path / "cache", tmp_path / "target"
    out.mkdir()
    target.mkdir()
    (out / "train").symlink_to(target)
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out)
    one_line_error(result, f"{out / 'train'}: a symbolic link inside the cache")
    assert list(target.iterdir()) == []

