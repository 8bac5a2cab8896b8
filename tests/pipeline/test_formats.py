"""Row formats: standard, conversational, ShareGPT, implicit prompt (TRL's extract_prompt as the
oracle), system column, renamed and absent columns, K rejected, valid fraction, rows that cannot be
trained on (missing prompt, identical or empty answers)."""

import json

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.pipeline.encode import RowRejected
from mlx_dpo.pipeline.formats import Fields, normalize

USER = {"role": "user", "content": "What color is the sky?"}
IMPLICIT = Fields(prompt=None)


def split(raw, fields=None):
    """normalize's row, or the reason it rejects the row."""
    try:
        result = normalize(raw, fields or Fields())
    except RowRejected as reason:
        return str(reason)
    return result[0] if isinstance(result, tuple) else result


run = tiny_models.invoke_cli


def precompute(model, rows, out, *flags):
    data = out.parent / (out.name + ".jsonl")
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return run("precompute", "--model", model, "--data", data, "--out", out, "--max-length", 64, *flags)


def cached(out, split="train"):
    table = pq.read_table(sorted((out / split).glob("part-*.parquet")))
    return {r["index"]: r for r in table.to_pylist()}


def rejects(out):
    return {r["index"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def ids(row):
    return row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]


# ------------------------------------------------------------------ implicit prompt: TRL's extract_prompt

def msg(role, content):
    return {"role": role, "content": content}


SYSTEM, U1, A1, U2 = msg("system", "Be brief."), msg("user", "Capital of Peru?"), msg("assistant", "Lima."), msg("user", "And of Chile?")
IMPLICIT_CASES = [
    ("The answer is 42", "The answer is 4"),  # one a prefix of the other: TRL splits one item before its end
    ("The answer is 4", "The answer is 42"),
    ("Q: sky? It is blue.", "Q: sky? It is green."),  # the space before the split goes with the answers
    ("Hi there", "Hi there, friend"),
    ("Précis : café au lait ☕", "Précis : café noir ☕"),
    ("Yes", "No"),  # nothing shared: an empty prompt, as TRL
    ("Same answer.", "Same answer."),
    ("Yes ", "No"),  # TRL's chosen[idx - 1] wraps around to the last character
    ("", "x"),
    ("x", ""),
    ([U1, A1], [U1, msg("assistant", "Cusco.")]),
    ([SYSTEM, U1, A1, U2, msg("assistant", "Santiago.")], [SYSTEM, U1, A1, U2, msg("assistant", "Lima.")]),
    ([U1, A1], [U1, A1, U2, msg("assistant", "Santiago.")]),  # chosen is a prefix of the rejected conversation
    ([U1, A1, U2, msg("assistant", "Santiago.")], [U1, A1]),
    ([U1, A1], [U1, A1]),
    ([A1], [msg("assistant", "Cusco.")]),  # no shared first message
    ([U1], [U1, A1]),
]


def _trainable(trl: dict | None) -> bool:
    """Whether TRL's split is a row anyone could train on."""
    if trl is None:  # TRL raised (UnboundLocalError on an empty answer)
        return False
    if trl["chosen"] == trl["rejected"]:
        return False
    if isinstance(trl["chosen"], str):
        return bool(trl["chosen"].strip() and trl["rejected"].strip())
    return bool(trl["prompt"])  # a chat template cannot render an empty conversation as the prompt


@pytest.mark.parametrize("chosen, rejected", IMPLICIT_CASES)
def test_implicit_prompt_is_trls_extract_prompt(chosen, rejected):
    from trl.data_utils import extract_prompt

    try:
        trl = extract_prompt({"chosen": chosen, "rejected": rejected})
    except Exception:
        trl = None
    ours = split({"chosen": chosen, "rejected": rejected}, IMPLICIT)
    if isinstance(ours, str):  # rejected: only where TRL's split cannot be trained on
        assert not _trainable(trl), f"TRL trains {trl}, we reject: {ours}"
    else:
        assert trl is not None and (ours["prompt"], ours["chosen"], ours["rejected"]) == (
            trl["prompt"], trl["chosen"], trl["rejected"])


def test_implicit_prompt_reasons_are_true():
    assert split({"chosen": "Same answer.", "rejected": "Same answer."}, IMPLICIT) == "chosen identical to rejected"
    assert split({"chosen": [U1, A1], "rejected": [U1, A1]}, IMPLICIT) == "chosen identical to rejected"
    assert split({"chosen": "", "rejected": "x"}, IMPLICIT) == "empty chosen"


def test_implicit_prompt_end_to_end(tiny_model_dir, tmp_path):
    text = [{"chosen": "The answer is 42", "rejected": "The answer is 4"},
            {"chosen": "The answer is 4.", "rejected": "The answer is 4."}]
    conversations = [{"chosen": [U1, A1], "rejected": [U1, A1, U2, msg("assistant", "Santiago.")]}]
    for name, rows in (("text", text), ("conversations", conversations)):
        result = precompute(tiny_model_dir, rows, tmp_path / name)
        assert result.exit_code == 0, result.output
    assert sorted(cached(tmp_path / "text")) == [0] and sorted(cached(tmp_path / "conversations")) == [0]
    assert rejects(tmp_path / "text") == {1: "chosen identical to rejected"}


# ------------------------------------------------------------------ ShareGPT and single message objects

SHAREGPT_ROW = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of Peru?"}],
                "chosen": {"from": "gpt", "value": "Lima."}, "rejected": {"from": "gpt", "value": "Cusco."}}


def test_sharegpt_row_becomes_messages():
    row, kind = normalize(SHAREGPT_ROW, Fields(prompt="conversations"))
    assert kind == "sharegpt"
    assert row["prompt"] == [SYSTEM, U1]
    assert (row["chosen"], row["rejected"]) == ([A1], [msg("assistant", "Cusco.")])


def test_one_message_object_as_an_answer():
    row, kind = normalize({"prompt": [U1], "chosen": A1, "rejected": msg("assistant", "Cusco.")}, Fields())
    assert kind == "conversational" and (row["chosen"], row["rejected"]) == ([A1], [msg("assistant", "Cusco.")])


def _sharegpt(messages):
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": speakers[m["role"]], "value": m["content"]} for m in messages]


CONVERSATIONS = [  # (prompt messages, chosen text, rejected text)
    ([SYSTEM, U1], "Lima.", "Cusco."),
    ([U1, A1, U2], "Santiago.", "Valparaíso, I think — or was it Lima?"),
    ([msg("user", "Translate « bonjour » into English.")], "Hello.", "Goodbye."),
]


def test_sharegpt_and_message_objects_cache_as_message_lists(tiny_model_dir, tmp_path):
    """The same conversations as role/content lists (the format TRL parity is tested on), as
    ShareGPT rows, and with one message object per answer: the same cached token ids."""
    lists = [{"prompt": p, "chosen": [msg("assistant", c)], "rejected": [msg("assistant", r)]} for p, c, r in CONVERSATIONS]
    objects = [{"prompt": p, "chosen": msg("assistant", c), "rejected": msg("assistant", r)} for p, c, r in CONVERSATIONS]
    sharegpt = [{"conversations": _sharegpt(p), "chosen": _sharegpt([msg("assistant", c)])[0],
                 "rejected": _sharegpt([msg("assistant", r)])[0]} for p, c, r in CONVERSATIONS]
    results = {name: precompute(tiny_model_dir, rows, tmp_path / name)
               for name, rows in (("lists", lists), ("objects", objects), ("sharegpt", sharegpt))}
    for result in results.values():
        assert result.exit_code == 0, result.output
    assert "format: sharegpt" in results["sharegpt"].output
    assert "format: conversational" in results["objects"].output
    expected = {i: ids(r) for i, r in cached(tmp_path / "lists").items()}
    assert len(expected) == len(CONVERSATIONS)
    for name in ("objects", "sharegpt"):
        assert {i: ids(r) for i, r in cached(tmp_path / name).items()} == expected, name


# ------------------------------------------------------------------ columns

def test_system_column():
    conversational = split({"prompt": [USER], "chosen": "a", "rejected": "b", "system": "Be brief."})
    assert conversational["prompt"] == [{"role": "system", "content": "Be brief."}, USER]
    text = split({"prompt": "Q?", "chosen": "a", "rejected": "b", "system": "Be brief."})
    assert text["prompt"] == "Be brief.\n\nQ?"


def test_renamed_columns_and_several_rejected():
    fields = Fields(prompt="question", chosen="good", rejected="bad")
    row = split({"question": "Q?", "good": " yes", "bad": [" no", " maybe"]}, fields)
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("Q?", " yes", [" no", " maybe"])


def test_implicit_prompt_with_several_rejected_is_refused():
    assert "exactly one rejected" in split({"chosen": "a b", "rejected": ["a c", "a d"]}, IMPLICIT)


@pytest.mark.parametrize("flag, name", [("--prompt-field", "querry"), ("--system-field", "sys"),
                                        ("--chosen-field", "good"), ("--rejected-field", "bad")])
def test_an_option_naming_an_absent_column_is_an_error(tiny_model_dir, tmp_path, flag, name):
    rows = [{"prompt": "Q?", "chosen": " yes", "rejected": " no"}]
    result = precompute(tiny_model_dir, rows, tmp_path / "c", flag, name)
    assert result.exit_code == 1
    assert f"{flag} {name!r}: no such column (columns: prompt, chosen, rejected)" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_null_or_absent_prompt_is_a_missing_prompt(tiny_model_dir, tmp_path):
    good = {"prompt": "Two plus two is", "chosen": " The answer is four.", "rejected": " The answer is five."}
    rows = [good, {**good, "prompt": None}, {k: v for k, v in good.items() if k != "prompt"}]
    result = precompute(tiny_model_dir, rows, tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert sorted(cached(tmp_path / "c")) == [0]
    assert rejects(tmp_path / "c") == {1: "missing prompt", 2: "missing prompt"}
    result = precompute(tiny_model_dir, rows, tmp_path / "strict", "--strict")
    assert result.exit_code == 1 and "[train] row 1: missing prompt (--strict: 2 of 3 rows" in result.output


def test_answers_identical_after_tokenization_or_empty_are_rejected(tiny_model_dir, tmp_path):
    eos = "</s>"  # the tiny tokenizer's
    good = {"prompt": [U1], "chosen": [A1], "rejected": [msg("assistant", "Cusco.")]}
    text = [{"prompt": "Say bye.", "chosen": " Bye.", "rejected": " Bye." + eos}, {"prompt": "Q?", "chosen": " Yes.", "rejected": " No."}]
    conversations = [{**good, "chosen": [msg("assistant", "")]}, {**good, "rejected": [msg("assistant", " ")]}, good]
    for name, rows in (("text", text), ("conversations", conversations)):
        result = precompute(tiny_model_dir, rows, tmp_path / name)
        assert result.exit_code == 0, result.output
    assert rejects(tmp_path / "text") == {0: "chosen identical to rejected after tokenization"}
    assert rejects(tmp_path / "conversations") == {0: "empty chosen", 1: "empty rejected"}


def test_a_run_that_would_cache_nothing_is_an_error(tiny_model_dir, tmp_path):
    rows = [{"prompt": "Q?", "chosen": "", "rejected": " no"}] * 2
    result = precompute(tiny_model_dir, rows, tmp_path / "c")
    assert result.exit_code == 1 and "[train]: none of its 2 rows could be cached (2 empty chosen)" in result.output
    assert not (tmp_path / "c" / "manifest.json").exists()


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


def test_k_rejected_answers_may_be_sharegpt_message_lists(tiny_model_dir, tmp_path):
    """Each of K rejected answers is read in either message form: ShareGPT answers cache the same
    token ids as the same rows in {role, content} form."""
    def sharegpt(text):
        return [{"from": "gpt", "value": text}]

    cases = [("Peru", "Lima.", "Cusco.", "Arequipa."), ("Chile", "Santiago.", "Lima.", "Valparaíso.")]
    rows = {"sharegpt": [{"conversations": [{"from": "human", "value": f"Capital of {country}?"}],
                          "chosen": sharegpt(right), "rejected": [sharegpt(wrong1), sharegpt(wrong2)]}
                         for country, right, wrong1, wrong2 in cases],
            "lists": [{"prompt": [msg("user", f"Capital of {country}?")], "chosen": [msg("assistant", right)],
                       "rejected": [[msg("assistant", wrong1)], [msg("assistant", wrong2)]]}
                      for country, right, wrong1, wrong2 in cases]}
    results = {name: precompute(tiny_model_dir, data, tmp_path / name) for name, data in rows.items()}
    for name, result in results.items():
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["rejected_per_prompt"] == 2 and manifest["splits"]["train"]["rows_cached"] == 2, name
    assert "format: sharegpt" in results["sharegpt"].output
    assert {i: ids(r) for i, r in cached(tmp_path / "sharegpt").items()} == {i: ids(r) for i, r in cached(tmp_path / "lists").items()}


@pytest.mark.parametrize("speaker", [{"name": "human"}, ["human"], 1])
def test_a_sharegpt_speaker_that_is_no_string_is_a_reject(tiny_model_dir, tmp_path, speaker):
    """A row whose speaker is an object, a list or a number is rejected with its reason; a run of
    only such rows stops with that reason (never an internal error)."""
    assert split({"conversations": [{"from": speaker, "value": "Capital of Peru?"}],
                  "chosen": {"from": "gpt", "value": "Lima."}, "rejected": {"from": "gpt", "value": "Cusco."}},
                 Fields(prompt="conversations")) == (
        f"ShareGPT speaker {speaker!r} is {type(speaker).__name__}, not a string")
    bad = {"conversations": [{"from": speaker, "value": "Capital of Peru?"}],
           "chosen": {"from": speaker, "value": "Lima."}, "rejected": {"from": speaker, "value": "Cusco."}}
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data",
                                    tiny_models.write_jsonl(tmp_path / "d.jsonl", [bad, bad]), "--out", tmp_path / "c",
                                    catch_exceptions=True)
    assert isinstance(result.exception, SystemExit | None), repr(result.exception)  # not an internal error
    assert result.exit_code == 1 and "ShareGPT speaker" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


# ---- CSV and TSV cells as written (datasets reads them through pandas, 10,000 rows at a time)

def _write_csv(path, rows, sep=","):
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=sep)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cached_answers(model, cache):
    from mlx_dpo.models import load_tokenizer

    manifest = json.loads((cache / "manifest.json").read_text())
    rows = [r for s in manifest["splits"]["train"]["shards"] for r in pq.read_table(cache / s["path"]).to_pylist()]
    tokenizer = load_tokenizer(model)
    return {r["index"]: tokenizer.decode(r["chosen_ids"], skip_special_tokens=True) for r in rows}


def test_a_csv_answer_is_cached_as_written(tiny_model_dir, tmp_path):
    """README: "A field whose JSON type changes between rows is refused too (...): `datasets` would turn
    it into a column that silently re-reads the text"; "Every input row is either in a shard or in
    `rejects.jsonl` with its reason" (the row cached is the input row). pandas types each 10,000-row
    chunk alone: in a chunk of number-like answers " 0.50" came back as "0.5", with no reject."""
    rows = [{"prompt": f"Q{i}: a word?", "chosen": "same", "rejected": "same"} for i in range(10_000)]  # rejects
    rows += [{"prompt": f"R{i}: one half, to two decimals?", "chosen": " 0.50", "rejected": " 0.5000001"}
             for i in range(3)]
    data = _write_csv(tmp_path / "prefs.csv", rows)
    run_ok = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c", "--max-length", "64",
                 "--rows-per-shard", "20000")
    assert run_ok.exit_code == 0, run_ok.output
    chosen = _cached_answers(tiny_model_dir, tmp_path / "c")[10_000]
    assert chosen.strip() == "0.50", f"row 10000: the file's chosen ' 0.50' was cached as {chosen!r}"


@pytest.mark.parametrize("layout", ["prefs.csv", "folder/train.tsv"])
def test_csv_and_tsv_texts_that_look_like_missing_values_stay_text(tiny_model_dir, tmp_path, layout):
    """pandas reads "NA", "null", "nan", "N/A" as missing by default: such answers would be rejected
    as missing, or dropped from a row, instead of being trained on as written; an empty cell stays missing."""
    answers = ["NA", "null", "nan", "N/A", "007"]
    rows = [{"prompt": f"Q{i}: your answer?", "chosen": a, "rejected": " no."} for i, a in enumerate(answers)]
    rows.append({"prompt": "Q5: your answer?", "chosen": "", "rejected": " no."})
    file = _write_csv(tmp_path / layout, rows, "\t" if layout.endswith(".tsv") else ",")
    data = file if layout.endswith(".csv") else file.parent
    result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c", "--max-length", "64")
    assert result.exit_code == 0, result.output
    cached = _cached_answers(tiny_model_dir, tmp_path / "c")
    assert [cached.get(i, "").strip() for i in range(5)] == answers
    assert 5 not in cached  # the empty cell: a missing answer, rejected as before
