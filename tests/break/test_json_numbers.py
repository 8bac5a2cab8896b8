"""Break: a JSON number written as an integer in one row and with a fraction in another (a tool call's
arguments, a tool schema's bounds) passes the type check (both are "a number"), and Arrow gives the
whole column one type, float64: the row's `3` reaches the chat template as `3.0`. The answer trained
on (`{"days": 3.0}`) is not the one in the file (`{"days": 3}`), with no error and no reject.

README (Your own model and data, tool calling): "messages go to the chat template as written (answers
may call tools too; arguments a JSON string or an object, one of the two per file)"; "`tools` as a
list or its JSON text, kept as written".
"""

import json
import shutil

import pyarrow.parquet as pq

from tiny_models import run_cli, write_jsonl

# The tiny model's template, plus the tool calls of assistant messages rendered as JSON (as Qwen3's does)
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}{{ call.function.name + ' ' + (call.function.arguments | tojson) }}"
    "{% endfor %}{{ eos_token }}{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _row(days):
    call = {"type": "function", "function": {"name": "forecast", "arguments": {"city": "Lima", "days": days}}}
    return {"prompt": [{"role": "user", "content": f"Weather in Lima for {days} days?"}],
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
            "rejected": [{"role": "assistant", "content": "I cannot tell."}]}


def test_a_tool_call_argument_reaches_the_template_as_written(tiny_model_dir, tmp_path):
    from mlx_dpo.models import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    data = write_jsonl(tmp_path / "calls.jsonl", [_row(3), _row(2.5)])
    run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "256")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    tokenizer = load_tokenizer(model)
    # the oracle: the chat template on row 0 exactly as the file holds it
    row = json.loads(data.read_text().splitlines()[0])
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
                                               + TEMPLATE)
    tool = {"type": "function", "function": {"name": "forecast", "parameters": {
        "type": "object", "properties": {"units": {"type": "string", "default": None}}}}}
    row = {"prompt": [{"role": "user", "content": "Weather in Lima?"}],
           "chosen": [{"role": "assistant", "content": "Sunny."}],
           "rejected": [{"role": "assistant", "content": "No idea."}], "tools": [tool]}
    data = write_jsonl(tmp_path / "tools.jsonl", [row])
    run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "256")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    tokenizer = load_tokenizer(model)
    prompt = tokenizer.decode(cached[0]["prompt_ids"])
    assert '"default": null' in prompt, f"the prompt as trained: {prompt!r}"


def test_a_tool_call_keeps_the_key_order_it_is_written_in(tiny_model_dir, tmp_path):
    """Arrow gives every object of a column the field order of the first: row 1's arguments, written
    {"days": 2, "city": "Quito"}, reach the template (tojson keeps dict order) as {"city": ..., "days": ...}."""
    from mlx_dpo.models import load_tokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(TEMPLATE)
    second = _row(2)
    second["chosen"][0]["tool_calls"][0]["function"]["arguments"] = {"days": 2, "city": "Quito"}
    data = write_jsonl(tmp_path / "calls.jsonl", [_row(3), second])
    run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c", "--max-length", "256")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    cached = pq.read_table(tmp_path / "c" / manifest["splits"]["train"]["shards"][0]["path"]).to_pylist()
    trained = load_tokenizer(model).decode(cached[1]["chosen_ids"])
    assert '{"days": 2, "city": "Quito"}' in trained, f"row 1's chosen answer as trained: {trained!r}"
