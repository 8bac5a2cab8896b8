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
