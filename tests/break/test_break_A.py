"""Breaks of 296f41d (ShareGPT rows keep LLaMA-Factory's turn order): each test states what the README or a
docstring promises and fails on main where the code does otherwise. Rounds (74c12dc) held: see the report."""

import json

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.pipeline.formats import Fields, normalize


def sharegpt(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


def precompute(tmp_path, model_dir, rows) -> tuple[list[int], dict[int, str]]:
    """(cached indices, {rejected index: reason}) of `mlx-dpo precompute` on `rows` as JSONL."""
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "c"
    result = tiny_models.invoke_cli("precompute", "--model", model_dir, "--data", data, "--out", out)
    assert result.exit_code == 0, result.output
    cached = pq.read_table(sorted((out / "train").glob("part-*.parquet")))["index"].to_pylist()
    rejects = (out / "rejects.jsonl").read_text().splitlines() if (out / "rejects.jsonl").exists() else []
    return sorted(cached), {r["index"]: r["reason"] for r in map(json.loads, rejects)}


@pytest.mark.parametrize("prompt", ["conversations", None])  # the prompt column, or implicit
def test_a_system_column_and_a_first_system_turn_render_one_system_message(prompt):
    """README (ShareGPT row): speakers as LLaMA-Factory's, "the `system` and `tools` columns too"; turns.py:
    "an optional first system turn". LLaMA-Factory's SharegptDatasetConverter takes a first `system` turn as
    the system prompt and reads the `system` column only when there is none: one system message.
    Instead normalize keeps both (the column's, then the turn's): the chat template renders two system
    messages (Qwen3's, e.g., raises or renders the second mid-conversation). Known, not yet fixed."""
    turns = [sharegpt("system", "Be brief."), sharegpt("human", "Capital of Peru?")]
    if prompt is None:  # whole conversations, as LLaMA-Factory's converter gives them to TRL
        raw = {"chosen": turns + [sharegpt("gpt", "Lima.")], "rejected": turns + [sharegpt("gpt", "Cusco.")]}
    else:
        raw = {"conversations": turns, "chosen": sharegpt("gpt", "Lima."), "rejected": sharegpt("gpt", "Cusco.")}
    row, kind = normalize({**raw, "system": "Answer in French."}, Fields(prompt=prompt))
    assert kind == "sharegpt"
    systems = [m["content"] for m in row["prompt"] if m["role"] == "system"]
    assert len(systems) <= 1, systems  # LLaMA-Factory: ["Be brief."]


def test_empty_conversations_with_a_system_column_is_a_reject(tiny_model_dir, tmp_path):
    """README (ShareGPT row): a row with any {from, value} message keeps LLaMA-Factory's turn order: "the
    prompt ends on `human` or `observation`"; a row that breaks it is a reject (test_sharegpt_turns.py:
    "only a system turn" -> "conversations has no human turn for the answers to follow"). LLaMA-Factory
    drops an empty conversation too (an even message count in a ranking row).
    Instead `"conversations": []` with a `system` column is cached: check_sharegpt_turns skips an empty list
    (_written gives None, read as "plain text"), then _add_system makes the prompt [system] and the answers
    are trained after a system message alone. The same row written as a first system turn is a reject."""
    answers = {"chosen": sharegpt("gpt", "Lima."), "rejected": sharegpt("gpt", "Cusco.")}
    rows = [{"conversations": [sharegpt("system", "Be brief.")], "system": "", **answers},
            {"conversations": [], "system": "Be brief.", **answers}]
    cached, rejects = precompute(tmp_path, tiny_model_dir, rows)
    assert rejects[0] == "conversations has no human turn for the answers to follow"
    assert cached == [] and 1 in rejects, (cached, rejects)


def test_a_role_content_message_with_a_from_key_is_a_reject_not_a_traceback(tiny_model_dir, tmp_path):
    """Bad input (project bar, README "Nothing lost"): one clear reason per row in rejects, no traceback; a
    row of {role, content} messages is read as TRL reads it (README, ShareGPT row: only a row "with any
    {from, value} message" is checked). Instead a {role, content} message that also carries a `from` key
    (no `value`) is taken for a ShareGPT message (formats.as_messages tests `from`, _is_message tests
    `role`) and _message's value["value"] raises KeyError: precompute stops with a traceback, exit 1,
    nothing cached, no reason given. (The lookup predates 296f41d; the row is one the new check names
    "any {from, value} message".)"""
    answers = {"chosen": sharegpt("gpt", "Lima."), "rejected": sharegpt("gpt", "Cusco.")}
    rows = [{"conversations": [sharegpt("human", "Capital of Peru?")], **answers},
            {"conversations": [{"role": "user", "content": "Capital of Peru?", "from": "human"}], **answers}]
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", rows)
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c",
                                    catch_exceptions=True)
    assert not isinstance(result.exception, KeyError), repr(result.exception)
    assert result.exit_code == 0, result.output
