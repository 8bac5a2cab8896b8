"""Chat-template options: per-row `tools` and `chat_template_kwargs` columns and the run's
--chat-template-kwargs reach the template as TRL passes them (apply_chat_template itself is the
oracle); prompt tails a template drops are counted; a template that raises rejects the row."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny_models

ROLE_TURNS = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
)
# Tools and a `brief` option become system turns before the conversation.
OPTIONS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>\nTools: ' + (tools | tojson) + '\n' }}{% endif %}"
    "{% if brief %}{{ '<|system|>\nBe brief.\n' }}{% endif %}"
    + ROLE_TURNS + "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# A reasoning template: the generation prompt opens a thought the rendered conversation does not have.
THINK_TEMPLATE = (
    "{{ bos_token }}" + ROLE_TURNS
    + "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% if thinking is not defined or thinking %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}"
    + ROLE_TURNS + "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}


run = tiny_models.invoke_cli


def model_with_template(tiny_model_dir, directory, template):
    shutil.copytree(tiny_model_dir, directory)
    (directory / "chat_template.jinja").write_text(template)
    return directory


def conversation(question, chosen, rejected, system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def precompute(model, rows, out, *flags, suffix=".jsonl"):
    data = out.parent / (out.name + suffix)
    if suffix == ".parquet":  # Arrow gives every struct of a column all their keys, absent ones null
        pq.write_table(pa.Table.from_pylist(rows), data)
    else:
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return run("precompute", "--model", model, "--data", data, "--out", out, *flags)


def cached(out):
    return {r["index"]: r for r in pq.read_table(sorted((out / "train").glob("*.parquet"))).to_pylist()}


def rejects(out):
    return {r["index"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def options_model(tiny_model_dir, tmp_path_factory):
    return model_with_template(tiny_model_dir, tmp_path_factory.mktemp("options") / "model", OPTIONS_TEMPLATE)


@pytest.mark.parametrize("tools_as", ["objects", "json text", "parquet"])
def test_tools_and_template_kwargs_reach_the_template(options_model, tmp_path, tools_as):
    """Row 0: two tools whose definitions have different keys (in Parquet, Arrow fills the missing
    ones with null; the template must see the row's own) and brief; row 1: brief false (wins over the run's
    true); row 2: no tools, no options (the run's brief applies)."""
    from transformers import AutoTokenizer

    encode = json.dumps if tools_as == "json text" else (lambda tools: tools)
    rows = [{**conversation("Weather in Lima, then 2+3?", "Sunny; 5.", "Rainy; 6."),
             "tools": encode([WEATHER, ADD]), "chat_template_kwargs": {"brief": True}},
            {**conversation("And in Cusco?", "Cold.", "Hot."), "tools": encode([WEATHER]),
             "chat_template_kwargs": {"brief": False}},
            {**conversation("Hello!", "Hi.", "Go away."), "tools": None, "chat_template_kwargs": None}]
    result = precompute(options_model, rows, tmp_path / "c", "--chat-template-kwargs", '{"brief": true}',
                        suffix=".parquet" if tools_as == "parquet" else ".jsonl")
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(str(options_model))
    expected_options = [{"tools": [WEATHER, ADD], "brief": True}, {"tools": [WEATHER], "brief": False}, {"brief": True}]
    got = cached(tmp_path / "c")
    for index, (row, options) in enumerate(zip(rows, expected_options)):
        for side in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True, return_dict=True, **options)
            assert got[index]["prompt_ids"] + got[index][f"{side}_ids"] == list(full["input_ids"]), (index, side)
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True,
                                               add_generation_prompt=True, **options)
        assert got[index]["prompt_ids"] == list(prompt["input_ids"]), index


def test_run_template_options_are_in_the_identity(options_model, tmp_path):
    rows = [conversation("Hello!", "Hi.", "Go away."), conversation("2+2?", "4.", "5.")]
    plain = precompute(options_model, rows, tmp_path / "plain")
    brief = precompute(options_model, rows, tmp_path / "brief", "--chat-template-kwargs", '{"brief": true}')
    assert plain.exit_code == 0 and brief.exit_code == 0, plain.output + brief.output
    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("plain", "brief")}
    assert manifests["plain"]["identity"] != manifests["brief"]["identity"]
    assert manifests["brief"]["identity_fields"]["options"]["chat_template_kwargs"] == {"brief": True}
    assert cached(tmp_path / "plain")[0]["prompt_ids"] != cached(tmp_path / "brief")[0]["prompt_ids"]
    again = run("precompute", "--model", options_model, "--data", tmp_path / "plain.jsonl", "--out", tmp_path / "plain",
                "--chat-template-kwargs", '{"brief": true}')
    assert again.exit_code == 1 and "options.chat_template_kwargs differs" in again.output


@pytest.mark.parametrize("value, expected", [
    ("{oops", "--chat-template-kwargs: not JSON"),
    ("[1]", "--chat-template-kwargs: expected a JSON object"),
    ('{"add_generation_prompt": false}', "add_generation_prompt is set by mlx-dpo itself"),
    ('{"return_tensors": "np"}', "return_tensors is set by mlx-dpo itself"),
    ('{"truncation": true, "max_length": 4}', "max_length, truncation is set by mlx-dpo itself"),
])
def test_bad_run_template_options(tiny_model_dir, standard_data, tmp_path, value, expected):
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "c",
                 "--chat-template-kwargs", value)
    assert result.exit_code == 1 and expected in result.output and len(result.output.strip().splitlines()) == 1


def test_dropped_prompt_tails_are_counted_and_shown(tiny_model_dir, tmp_path):
    model = model_with_template(tiny_model_dir, tmp_path / "model", THINK_TEMPLATE)
    rows = [conversation("2+2?", "4.", "5."), conversation("Capital of Peru?", "Lima.", "Cusco.", system="Be brief."),
            {**conversation("Hello!", "Hi.", "Go away."), "chat_template_kwargs": {"thinking": False}}]
    result = precompute(model, rows, tmp_path / "c")
    assert result.exit_code == 0, result.output
    line = "prompt tail dropped: 2 rows (the chat template renders the prompt alone otherwise"
    assert line in result.output and "e.g. row 0: '<think>\\n' is in no training sequence" in result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["inputs"]["train"]["prompt_tail_dropped"] == 2
    inspect = run("cache", "inspect", tmp_path / "c")
    assert inspect.exit_code == 0 and line in inspect.output and "format: conversational" in inspect.output
    # Without the thought the prompt renders the same alone: nothing dropped, nothing said.
    result = precompute(model, rows, tmp_path / "off", "--chat-template-kwargs", '{"thinking": false}')
    assert result.exit_code == 0 and "prompt tail dropped" not in result.output, result.output


def test_a_template_that_raises_rejects_the_row(tiny_model_dir, tmp_path):
    model = model_with_template(tiny_model_dir, tmp_path / "model", NO_SYSTEM_TEMPLATE)
    rows = [conversation("Capital of Peru?", "Lima.", "Cusco.", system="Be brief."), conversation("2+2?", "4.", "5.")]
    result = precompute(model, rows, tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in (tmp_path / "c" / "rejects.jsonl").read_text().splitlines()] == [
        {"split": "train", "index": 0, "reason": "chat template error: System role not supported"}]
    assert sorted(cached(tmp_path / "c")) == [1]
    result = precompute(model, rows, tmp_path / "strict", "--strict")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"{tmp_path / 'strict.jsonl'} [train] row 0: chat template error: System role not supported" in result.output


def test_every_apply_chat_template_argument_is_reserved_or_a_template_input():
    """Each named argument of the installed transformers' apply_chat_template is either set by the
    encoder (refused in a row's or the run's options) or only shapes the rendered text."""
    import inspect

    from transformers import PreTrainedTokenizerBase

    from mlx_dpo.pipeline.config import RESERVED_TEMPLATE_ARGUMENTS, TEMPLATE_INPUT_ARGUMENTS

    named = set(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}
    assert named == RESERVED_TEMPLATE_ARGUMENTS | TEMPLATE_INPUT_ARGUMENTS


@pytest.mark.parametrize("options", [{"return_tensors": "np"}, {"padding": "max_length", "max_length": 64},
                                     {"tokenize": False}])
def test_a_row_setting_a_tokenization_argument_is_rejected(tiny_model_dir, tmp_path, options):
    """A row's chat_template_kwargs may not change how the encoder tokenizes (return_tensors made the
    whole run fail on broadcasting): that row is rejected naming the field, the others are cached."""
    rows = [conversation(f"What is {i}+{i}?", f"{2 * i}.", f"{2 * i + 1}.") for i in range(3)]
    rows[1]["chat_template_kwargs"] = options
    result = precompute(tiny_model_dir, rows, tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert set(cached(tmp_path / "c")) == {0, 2}
    assert rejects(tmp_path / "c") == {1: f"chat_template_kwargs: {', '.join(sorted(options))} is set by mlx-dpo itself"}


@pytest.mark.parametrize("value", [False, 0, [], "", "null", 5, [1], "[]"])
def test_a_row_chat_template_kwargs_that_is_no_object_is_rejected(tiny_model_dir, tmp_path, value):
    """Falsy non-objects (false, 0, []) are rejected like [1] and 5, not read as no options; JSON
    text is read as its value ("null": no options, "[]": a list)."""
    rows = [conversation(f"What is {i}+{i}?", f"{2 * i}.", f"{2 * i + 1}.") for i in range(3)]
    rows[0]["chat_template_kwargs"] = value
    result = precompute(tiny_model_dir, rows, tmp_path / "c")
    assert result.exit_code == 0, result.output
    if value == "null":
        assert rejects(tmp_path / "c") == {} and set(cached(tmp_path / "c")) == {0, 1, 2}
    else:
        reason = rejects(tmp_path / "c")[0]
        assert reason.startswith("chat_template_kwargs ") and ("not an object" in reason or "not valid JSON" in reason), reason


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    import real_tokenizers

    return AutoTokenizer.from_pretrained(str(real_tokenizers.qwen3_tokenizer_files()))


def test_tools_as_json_text_keep_their_nulls(qwen3_tokenizer):
    """Tools given as JSON text reach the template as written, null-valued keys included: token ids
    equal TRL 1.16's (which json.loads the text). Only Arrow's filled-in nulls are dropped."""
    from trl.data_utils import _tokenize

    from mlx_dpo.pipeline.encode import encode_row
    from mlx_dpo.pipeline.formats import Fields, normalize

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "unit": {"type": ["string", "null"], "default": None}}}}}]
    raw = {**conversation("Weather in Lima?", "Sunny.", "Rain."), "tools": json.dumps(tools),
           "chat_template_kwargs": json.dumps({"enable_thinking": None})}
    row, _ = normalize(raw, Fields())
    assert row["tools"] == tools and row["chat_template_kwargs"] == {"enable_thinking": None}
    ours = encode_row(qwen3_tokenizer, {**row, "chat_template_kwargs": {}})
    theirs = _tokenize(qwen3_tokenizer, raw["prompt"], add_generation_prompt=True, tools=json.loads(raw["tools"]))
    assert ours.prompt_ids == list(theirs["input_ids"])
    assert '"default": null' in qwen3_tokenizer.decode(ours.prompt_ids)
