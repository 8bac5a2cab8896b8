"""Tool-calling conversations on the real Qwen3 tokenizer, through its own chat template: OpenAI-style assistant
messages with `tool_calls` and null or absent content, `tool` messages, and LLaMA-Factory's ShareGPT speakers
`function_call` and `observation`.

Oracle: TRL 1.16's own tokenization functions (`trl.data_utils._tokenize`, `common_prefix_length`, as its
DPOTrainer uses them) on the rows as written in Python, before any file or Arrow sees them. Rows whose tool-call
arguments are JSON text, and objects whose keys differ from row to row (Arrow gives every object of a column the
keys of all of them, as nulls, which a template would render), are checked here; test_real_tokenizers.py runs
TRL's whole DPOTrainer on rows of one argument shape. At the end, on the tiny model with a template that renders
tool calls and tools as JSON: numbers, key order and nulls of object-valued fields as the file writes them.
"""

import json
import shutil

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.pipeline.encode import RowRejected
from mlx_dpo.pipeline.formats import Fields, normalize
from real_tokenizers import qwen3_model  # noqa: F401  (fixture, requested by name)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}


def user(text):
    return {"role": "user", "content": text}


def assistant(text, *calls):
    return {"role": "assistant", "content": text, **({"tool_calls": list(calls)} if calls else {})}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool(content):
    return {"role": "tool", "content": content}


ROWS = {
    "json-arguments": [  # arguments as JSON text, as the OpenAI API returns them
        {"prompt": [user("Weather in Lima?"), assistant(None, call("get_weather", '{"city": "Lima"}')),
                    tool('{"temp_c": 18}')], "tools": [WEATHER],
         "chosen": [assistant("18 °C.")], "rejected": [assistant("30 °C.")]},
        {"prompt": [user("Weather in Cusco?")], "tools": [WEATHER],
         "chosen": [assistant(None, call("get_weather", '{"city": "Cusco"}'))],
         "rejected": [assistant(None, call("get_weather", '{"city": "Lima"}'))]},
    ],
    "object-arguments": [  # arguments as objects with other keys in each row
        {"prompt": [user("Weather in Lima?")], "tools": [WEATHER, ADD],
         "chosen": [assistant(None, call("get_weather", {"city": "Lima"}))], "rejected": [assistant("Sunny.")]},
        {"prompt": [user("2 + 3?"), assistant(None, call("add", {"a": 2, "b": 3})), tool("5")], "tools": [WEATHER, ADD],
         "chosen": [assistant("5.")], "rejected": [assistant("6.")]},
    ],
    "implicit-prompt": [  # no prompt column: the prompt is split off as TRL's extract_prompt does
        {"chosen": [user("Weather in Lima?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Lima"})]}],
         "rejected": [user("Weather in Lima?"), assistant("Sunny.")], "tools": [WEATHER]},
        {"chosen": [user("2 + 3?"), assistant(None, call("add", {"a": 2, "b": 3})), tool("5"), assistant("5.")],
         "rejected": [user("2 + 3?"), assistant("6.")], "tools": [ADD]},
    ],
}


def as_trl_writes_it(messages):
    """Content "" for a tool-call message: what Qwen3's template needs (see test_null_content_...)."""
    return [{**m, "content": m.get("content") or ""} if m.get("tool_calls") else m for m in messages]


def trl_ids(tokenizer, row):
    from trl.data_utils import _tokenize, common_prefix_length, extract_prompt

    row = row if "prompt" in row else {**row, **extract_prompt(row)}
    prompt, chosen, rejected = (as_trl_writes_it(row[k]) for k in ("prompt", "chosen", "rejected"))
    prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, tools=row["tools"])["input_ids"]
    chosen_ids, rejected_ids = (_tokenize(tokenizer, prompt + a, tools=row["tools"])["input_ids"] for a in (chosen, rejected))
    start = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return prompt_ids[:start], chosen_ids[start:], rejected_ids[start:]


@pytest.mark.parametrize("name", ROWS)
def test_tool_calls_are_tokenized_as_trl_does(name, qwen3_model, tmp_path):  # noqa: F811  (the fixture)
    from transformers import AutoTokenizer

    rows = ROWS[name]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = tiny_models.invoke_cli("precompute", "--model", qwen3_model, "--data", data, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert ("format: implicit prompt" if name == "implicit-prompt" else "format: conversational") in result.output
    cached = {r["index"]: r for r in pq.read_table(sorted((tmp_path / "c" / "train").glob("*.parquet"))).to_pylist()}
    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_model))
    for i, row in enumerate(rows):
        assert (cached[i]["prompt_ids"], cached[i]["chosen_ids"], cached[i]["rejected_ids"]) == trl_ids(tokenizer, row), i
    text = tokenizer.decode(cached[0]["prompt_ids"] + cached[0]["chosen_ids"])
    assert '"arguments": {"city": "Lima"}}' in text and "null" not in text


def test_null_content_next_to_tool_calls_is_given_as_an_empty_string(qwen3_model):  # noqa: F811  (the fixture)
    """Why: Qwen3's template reads the content of every assistant message, and transformers drops null keys, so
    TRL's own tokenization of the row as written fails; the same conversation with content "" renders."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_model))
    messages = [user("Weather in Lima?"), assistant(None, call("get_weather", {"city": "Lima"}))]
    with pytest.raises(Exception, match="content"):
        _tokenize(tokenizer, messages, tools=[WEATHER])
    row, _ = normalize({"prompt": messages[:1], "chosen": messages[1:], "rejected": [assistant("Sunny.")]}, Fields())
    assert row["chosen"] == [assistant("", call("get_weather", {"city": "Lima"}))]


# ------------------------------------------------------------------ ShareGPT speakers, as LLaMA-Factory reads them

def sharegpt(*messages, chosen=("gpt", "Yes."), rejected=("gpt", "No.")):
    return {"conversations": [{"from": f, "value": v} for f, v in messages],
            "chosen": {"from": chosen[0], "value": chosen[1]}, "rejected": {"from": rejected[0], "value": rejected[1]}}


def split(raw):
    try:
        return normalize(raw, Fields(prompt="conversations"))[0]
    except RowRejected as reason:
        return str(reason)


def test_sharegpt_function_call_and_observation():
    one = '{"name": "get_weather", "arguments": {"city": "Lima"}}'
    row = split(sharegpt(("system", "Use tools."), ("human", "Weather in Lima?"), ("function_call", one),
                         ("observation", '{"temp_c": 18}'), chosen=("gpt", "18 °C."), rejected=("function_call", one)))
    lima = call("get_weather", {"city": "Lima"})
    assert row["prompt"] == [{"role": "system", "content": "Use tools."}, user("Weather in Lima?"), assistant("", lima),
                             tool('{"temp_c": 18}')]
    assert (row["chosen"], row["rejected"]) == ([assistant("18 °C.")], [assistant("", lima)])
    parallel = json.dumps([{"name": "get_weather", "arguments": {"city": c}} for c in ("Lima", "Cusco")])
    row = split(sharegpt(("human", "Lima and Cusco?"), chosen=("function_call", parallel)))
    assert row["chosen"] == [assistant("", lima, call("get_weather", {"city": "Cusco"}))]


@pytest.mark.parametrize("messages, chosen, reason", [
    ((("narrator", "Once."),), ("gpt", "Yes."), "unknown ShareGPT speaker 'narrator'"),
    ((("human", "Hi"),), ("bot", "Yes."), "unknown ShareGPT speaker 'bot'"),
    ((("human", "Hi"),), ("function_call", "get_weather(Lima)"), "function_call value is not valid JSON"),
    ((("human", "Hi"),), ("function_call", '{"name": "get_weather"}'), "function_call value is not a {name, arguments}"),
    ((("human", "Hi"),), ("function_call", "[]"), "function_call value is not a {name, arguments}"),
])
def test_sharegpt_rows_that_cannot_be_read_name_the_reason(messages, chosen, reason):
    assert split(sharegpt(*messages, chosen=chosen)).startswith(reason)


# ---- object-valued JSON fields reach the template as written (Arrow gives a column one type and key order)

# The tiny model's template, plus the tool calls of assistant messages rendered as JSON (as Qwen3's does)
CALLS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}{{ call.function.name + ' ' + (call.function.arguments | tojson) }}"
    "{% endfor %}{{ eos_token }}{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _forecast_row(days):
    call = {"type": "function", "function": {"name": "forecast", "arguments": {"city": "Lima", "days": days}}}
    return {"prompt": [{"role": "user", "content": f"Weather in Lima for {days} days?"}],
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
            "rejected": [{"role": "assistant", "content": "I cannot tell."}]}


@pytest.mark.parametrize("name", ["calls.jsonl", "calls.json"])
def test_a_tool_call_argument_reaches_the_template_as_written(tiny_model_dir, tmp_path, name):
    """README: "messages go to the chat template as written (answers may call tools too; arguments a
    JSON string or an object, one of the two per file)". A JSON number written as an integer in one row
    and with a fraction in another passes the type check (both are "a number"), and Arrow gave the whole
    column float64: row 0's `3` reached the chat template as `3.0`, with no error and no reject."""
    from mlx_dpo.models import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(CALLS_TEMPLATE)
    data = tmp_path / name
    if name.endswith(".json"):  # an array of rows, one row a line (so line 0 below is row 0)
        data.write_text("[\n" + ",\n".join(json.dumps(r) for r in [_forecast_row(3), _forecast_row(2.5)]) + "\n]\n")
    else:
        tiny_models.write_jsonl(data, [_forecast_row(3), _forecast_row(2.5)])
    tiny_models.run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "256")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    tokenizer = load_tokenizer(model)
    # the oracle: the chat template on row 0 exactly as the file holds it
    row = _forecast_row(3)
    expected = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert '"days": 3}' in expected
    trained = tokenizer.decode(cached[0]["chosen_ids"])
    assert '"days": 3}' in trained, f"row 0's chosen answer as trained: {trained!r}"


def test_a_tools_list_keeps_its_null_values(tiny_model_dir, tmp_path):
    """README: "`tools` as a list or its JSON text, kept as written: null values too". Written as a list
    (not JSON text), a schema's explicit `"default": null` is dropped with the nulls Arrow fills in."""
    from mlx_dpo.models import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text("{% if tools %}{{ '<|system|>\n' + (tools | tojson) + '\n' }}{% endif %}"
                                               + CALLS_TEMPLATE)
    tool = {"type": "function", "function": {"name": "forecast", "parameters": {
        "type": "object", "properties": {"units": {"type": "string", "default": None}}}}}
    row = {"prompt": [{"role": "user", "content": "Weather in Lima?"}],
           "chosen": [{"role": "assistant", "content": "Sunny."}],
           "rejected": [{"role": "assistant", "content": "No idea."}], "tools": [tool]}
    data = tiny_models.write_jsonl(tmp_path / "tools.jsonl", [row])
    tiny_models.run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "256")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    tokenizer = load_tokenizer(model)
    prompt = tokenizer.decode(cached[0]["prompt_ids"])
    assert '"default": null' in prompt, f"the prompt as trained: {prompt!r}"


def test_a_tool_call_keeps_the_key_order_it_is_written_in(tiny_model_dir, tmp_path):
    """README: messages go to the chat template "as written". Arrow gives every object of a column the
    field order of the first: row 1's arguments, written
    {"days": 2, "city": "Quito"}, reach the template (tojson keeps dict order) as {"city": ..., "days": ...}."""
    from mlx_dpo.models import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(CALLS_TEMPLATE)
    second = _forecast_row(2)
    second["chosen"][0]["tool_calls"][0]["function"]["arguments"] = {"days": 2, "city": "Quito"}
    data = tiny_models.write_jsonl(tmp_path / "calls.jsonl", [_forecast_row(3), second])
    tiny_models.run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "256")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    trained = load_tokenizer(model).decode(cached[1]["chosen_ids"])
    assert '{"days": 2, "city": "Quito"}' in trained, f"row 1's chosen answer as trained: {trained!r}"


def test_a_cache_is_not_reused_for_the_same_objects_in_another_key_order(tiny_model_dir, tmp_path):
    """README (Identity): different inputs into the same `--out` are refused. The identity hashes objects
    with sorted keys; row 1's arguments in another order train other token ids, so they count."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(CALLS_TEMPLATE)
    second = _forecast_row(2)
    tiny_models.write_jsonl(tmp_path / "calls.jsonl", [_forecast_row(3), second])
    tiny_models.run_cli("precompute", "--model", model, "--data", tmp_path / "calls.jsonl", "--out", tmp_path / "c",
                        "--max-length", "256")
    second["chosen"][0]["tool_calls"][0]["function"]["arguments"] = {"days": 2, "city": "Lima"}
    tiny_models.write_jsonl(tmp_path / "calls.jsonl", [_forecast_row(3), second])
    again = tiny_models.run_cli("precompute", "--model", model, "--data", tmp_path / "calls.jsonl",
                                "--out", tmp_path / "c", "--max-length", "256", ok=False)
    assert "Reusing cache" not in again.output, again.output
