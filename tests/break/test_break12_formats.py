"""Break tests for issue #12's formats and chat-template options (items 1-7)."""

import json

import pytest
from transformers import AutoTokenizer

import real_tokenizers
from mlx_dpo.pipeline.encode import encode_row
from mlx_dpo.pipeline.formats import Fields, normalize

U = {"role": "user", "content": "Weather in Lima?"}


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return AutoTokenizer.from_pretrained(str(real_tokenizers.qwen3_tokenizer_files()))


def test_tools_json_text_keeps_its_nulls(qwen3_tokenizer):
    """Stated (item 6, README's format table): per-row `tools` (a list, or its JSON text) go to the chat
    template as TRL 1.16 passes them, and token ids equal TRL's. Happens: a tool given as JSON text loses
    every null-valued key (drop_nulls, meant for Arrow's filled-in nulls, also runs on the user's own
    JSON), so Qwen3's prompt renders `"unit": {"type": ["string", "null"]}` where the user's tool (and
    TRL's rendering) has `"unit": {"type": ["string", "null"], "default": null}`: other token ids, and
    the model is trained on a tool schema nobody wrote."""
    from trl.data_utils import _tokenize

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "unit": {"type": ["string", "null"], "default": None}}}}}]
    raw = {"prompt": [U], "chosen": [{"role": "assistant", "content": "Sunny."}],
           "rejected": [{"role": "assistant", "content": "Rain."}], "tools": json.dumps(tools)}
    row, _ = normalize(raw, Fields())
    ours = encode_row(qwen3_tokenizer, row)
    # TRL 1.16's tokenize_fn: tools = json.loads(text); apply_chat_template(prompt, tools=tools, ...)
    theirs = _tokenize(qwen3_tokenizer, raw["prompt"], add_generation_prompt=True, tools=json.loads(raw["tools"]))
    assert ours.prompt_ids == list(theirs["input_ids"]), (
        qwen3_tokenizer.decode(ours.prompt_ids)[-300:], qwen3_tokenizer.decode(theirs["input_ids"])[-300:])


def _conversational_rows(n: int = 3) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
             "rejected": [{"role": "assistant", "content": f"{2 * i + 1}."}]} for i in range(n)]


def _rejects(out) -> dict:
    path = out / "rejects.jsonl"
    return {r["index"]: r["reason"] for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def test_a_row_chat_template_kwargs_that_breaks_the_ids_is_named(tiny_model_dir, tmp_path):
    """Stated (item 6 and the bar): a row's chat_template_kwargs go to the chat template; a row that
    cannot be trained on goes to rejects.jsonl with its reason, and an error is one line naming file,
    row and field. Happens: one row with `"chat_template_kwargs": {"return_tensors": "np"}` (an
    apply_chat_template argument, like the reserved ones the run-level option refuses) makes the whole
    precompute die with an internal error naming no file, row or field:
    `Error: ValueError: operands could not be broadcast together with shapes (10,) (14,)  (run with
    --debug for the traceback)`, exit 1, nothing cached. (`--chat-template-kwargs '{"return_tensors":
    "np"}'` gives the same error instead of the 'set by mlx-dpo itself' refusal.)"""
    import tiny_models

    rows = _conversational_rows()
    rows[1]["chat_template_kwargs"] = {"return_tensors": "np"}
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "c"
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out, "--no-reuse",
                                    catch_exceptions=True)
    if result.exit_code == 0:
        assert 1 in _rejects(out), result.output
    else:
        assert "row 1" in result.output and "chat_template_kwargs" in result.output, (result.output, result.exception)


@pytest.mark.parametrize("value", [False, 0, []])
def test_a_chat_template_kwargs_value_that_is_no_object_is_rejected(tiny_model_dir, tmp_path, value):
    """Stated (formats.py, README's table): the `chat_template_kwargs` column holds an object; a row whose
    value is another type is rejected ("chat_template_kwargs is list, not an object", as `[1]` and `5`
    are). Happens: the falsy non-objects `false`, `0` and `[]` are silently read as no options (`... or
    {}`), the row is cached with the run's template options, and nothing is said (TRL 1.16 fails on
    `**[]`)."""
    import tiny_models

    rows = _conversational_rows()
    rows[0]["chat_template_kwargs"] = value
    rows[1]["chat_template_kwargs"] = value
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "c"
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out, "--no-reuse",
                                    catch_exceptions=True)
    if result.exit_code == 0:
        assert "not an object" in _rejects(out).get(0, ""), (result.output, _rejects(out))
    else:
        assert "chat_template_kwargs" in result.output, result.output


def test_k_rejected_answers_as_sharegpt_message_lists(tiny_model_dir, tmp_path):
    """Stated (README's format table; formats.py: "K rejected | rejected: a list of strings, or a list of
    message lists", ShareGPT messages accepted wherever messages are, and normalize() maps each of the K
    answers through as_messages for that). Happens: with ShareGPT answers,
    `"rejected": [[{"from": "gpt", "value": "Cusco."}], [{"from": "gpt", "value": "Arequipa."}]]`, every
    row is rejected: `Error: ... none of its 2 rows could be cached (2 rejected is list, not a string or
    message list)`, exit 1, while the same rows in {role, content} form are cached with K = 2
    (is_several only sees {role, content} lists, so the ShareGPT answers are never converted)."""
    import tiny_models

    def sharegpt(text):
        return [{"from": "gpt", "value": text}]

    rows = [{"conversations": [{"from": "human", "value": f"Capital of {country}?"}],
             "chosen": sharegpt(capital), "rejected": [sharegpt(wrong1), sharegpt(wrong2)]}
            for country, capital, wrong1, wrong2 in [("Peru", "Lima.", "Cusco.", "Arequipa."),
                                                     ("Chile", "Santiago.", "Lima.", "Valparaiso.")]]
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "c"
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out,
                                    "--no-reuse", catch_exceptions=True)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected_per_prompt"] == 2 and manifest["splits"]["train"]["rows_cached"] == 2, manifest["splits"]


def test_a_sharegpt_speaker_that_is_an_object_is_a_reject(tiny_model_dir, tmp_path):
    """Stated (item 1, the bar): ShareGPT rows are read; a row that cannot be trained on goes to
    rejects.jsonl with its reason (e.g. "unknown ShareGPT speaker 'Human'"), nothing is lost, and bad
    input never ends in an internal error. Happens: a speaker that is an object or a list
    (`"from": {"name": "human"}`, e.g. a nested export) crashes the whole precompute:
    `Error: TypeError: unhashable type: 'dict' (run with --debug for the traceback)`, exit 1, naming no
    file, row or field (the `speaker not in SHAREGPT_ROLES` lookup)."""
    import tiny_models

    good = {"conversations": [{"from": {"name": "human"}, "value": "Capital of Peru?"}],
            "chosen": {"from": {"name": "gpt"}, "value": "Lima."}, "rejected": {"from": {"name": "gpt"}, "value": "Cusco."}}
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", [good, good])
    out = tmp_path / "c"
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out,
                                    "--no-reuse", catch_exceptions=True)
    said = result.output + ("" if result.exception is None or isinstance(result.exception, SystemExit)
                            else f"<internal {type(result.exception).__name__}: {result.exception}>")
    assert "<internal" not in said, said
    # Every row has the bad speaker: the run stops with the reasons, which name the speaker.
    assert result.exit_code != 0 and "speaker" in said, said
