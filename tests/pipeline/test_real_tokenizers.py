"""Real tokenizers (Qwen3 with its chat template, Llama 3.2 without one) on tiny random models of their
vocabulary, on realistic rows of every input format: multi-turn and system prompts, tools, enable_thinking and
<think> answers, non-ASCII text, answers longer than --max-length, ShareGPT, implicit prompts, K rejected.

Two independent oracles:
- token ids: TRL 1.16's own DPOTrainer tokenization of the same rows (given in TRL's format, converted by this
  test), with the row's tools and chat_template_kwargs (merged with the run's --chat-template-kwargs);
- log-probs: an exact float64 torch forward over the cached ids, one sequence at a time. The cache (MLX, float32)
  must be within twice the error of a plain float32 torch forward of the same ids.
Rows we reject by design (missing prompt, answers identical after tokenization) are checked for their reason.
"""

import json
import warnings

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlx_dpo.cli import cli
from real_tokenizers import llama32_model, qwen3_model  # noqa: F401  (fixtures, requested by name)

ROW = "_row_index"
SHAREGPT_SPEAKERS = {"system": "system", "human": "user", "gpt": "assistant", "observation": "tool"}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = json.dumps([WEATHER_TOOL])  # TRL and LLaMA-Factory accept tools as JSON text
LONG_ANSWER = " ".join(["Gradient descent takes a small step against the gradient, then measures again."] * 6)


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


def system(text):
    return {"role": "system", "content": text}


# ------------------------------------------------------------------ rows: Qwen3

QWEN_CONVERSATIONAL = [  # run with --chat-template-kwargs '{"enable_thinking": false}'
    {"prompt": [system("You are a concise assistant."), user("Capital of Peru?"), assistant("Lima."),
                user("And its population?")],
     "chosen": [assistant("About 10 million in the metropolitan area.")], "rejected": [assistant("Two hundred.")]},
    {"prompt": [user("请用一句话解释什么是梯度下降。")],
     "chosen": [assistant("梯度下降沿着损失函数梯度的反方向逐步更新参数。")], "rejected": [assistant("我不知道。")]},
    {"prompt": [user("What's the weather in Lima right now?")], "tools": TOOLS,
     "chosen": [assistant("", tool_calls=[{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}])],
     "rejected": [assistant("It is always sunny in Lima.")]},
    {"prompt": [user("Is 91 prime?")],  # reasoning answers: with thinking off, the template's empty thought is dropped
     "chosen": [assistant("<think>\n91 = 7 × 13.\n</think>\n\nNo: 91 = 7 × 13.")],
     "rejected": [assistant("<think>\nIt looks prime.\n</think>\n\nYes.")]},
    {"prompt": [user("Is 97 prime?")], "chat_template_kwargs": {"enable_thinking": True},  # the row's value wins
     "chosen": [assistant("<think>\nNo divisor up to 9.\n</think>\n\nYes.")], "rejected": [assistant("No, 97 = 7 × 14.")]},
    {"prompt": [user("Explain gradient descent in detail.")],
     "chosen": [assistant(LONG_ANSWER)], "rejected": [assistant("It is a kind of descent.")]},
    {"prompt": [user("Écris un haïku sur la mer 🌊")],
     "chosen": [assistant("Vague après vague —\nla mer efface nos pas,\nle sel reste là.")], "rejected": [assistant("Non.")]},
    {"prompt": None, "chosen": [assistant("Orphan.")], "rejected": [assistant("Answer.")]},  # item 2
]
QWEN_SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Capital of Peru?"}], "system": "Be brief.",
     "chosen": {"from": "gpt", "value": "Lima."}, "rejected": {"from": "gpt", "value": "Cusco."}},
    {"conversations": [{"from": "system", "value": "Answer in French."}, {"from": "human", "value": "What is 2+2?"},
                       {"from": "gpt", "value": "Quatre."}, {"from": "human", "value": "And 3+3?"}], "system": None,
     "chosen": {"from": "gpt", "value": "Six."}, "rejected": {"from": "gpt", "value": "Sept."}},
    {"conversations": [{"from": "human", "value": "Weather in Cusco?"}], "system": None, "tools": TOOLS,
     "chosen": {"from": "gpt", "value": "Let me check with get_weather."}, "rejected": {"from": "gpt", "value": "Snowing, surely."}},
    {"conversations": [{"from": "human", "value": "Explain gradient descent in detail."}], "system": None,
     "chosen": {"from": "gpt", "value": LONG_ANSWER}, "rejected": {"from": "gpt", "value": "No."}},
]
# OpenAI-style tool calling: an assistant message whose content is null or absent next to its tool_calls, tool
# messages with tool_call_id/name, in the prompt and in the answers (arguments as objects with one key: TRL reads
# these rows through Arrow, which gives every object the keys of all of them).
def call(city, call_id=None):
    return {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}},
            **({"id": call_id} if call_id else {})}


def tool(content, call_id="call_1"):
    return {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": content}


QWEN_TOOL_CALLS = [
    {"prompt": [system("Use the tools."), user("Weather in Lima and in Cusco?"),
                assistant(None, tool_calls=[call("Lima", "call_1"), call("Cusco", "call_2")]),
                tool('{"temp_c": 18}', "call_1"), tool('{"temp_c": 9}', "call_2")], "tools": TOOLS,
     "chosen": [assistant("Lima: 18 °C. Cusco: 9 °C.")], "rejected": [assistant("Both are at 30 °C.")]},
    {"prompt": [user("Weather in Arequipa?")], "tools": TOOLS,
     "chosen": [{"role": "assistant", "tool_calls": [call("Arequipa")]}],  # no content key at all
     "rejected": [assistant(None, tool_calls=[call("Lima")])]},
    {"prompt": [user("Is it raining in Quito?")], "tools": TOOLS,  # a whole tool round trip as the answer
     "chosen": [assistant(None, tool_calls=[call("Quito")]), tool('{"rain": true}'), assistant("Yes, it is raining.")],
     "rejected": [assistant("No idea.")]},
    {"prompt": [user("Hi")], "chosen": [assistant(None)], "rejected": [assistant("Hello.")]},
    {"prompt": [user("Weather?"), assistant(None, tool_calls=[call("Lima")]), tool(None)], "tools": TOOLS,
     "chosen": [assistant("Sunny.")], "rejected": [assistant("Rainy.")]},
]
QWEN_SHAREGPT_TOOLS = [  # LLaMA-Factory's function_call (JSON of one call, or a list: parallel calls) and observation
    {"conversations": [{"from": "human", "value": "Weather in Lima?"},
                       {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Lima"}}'},
                       {"from": "observation", "value": '{"temp_c": 18}'}], "system": "Use the tools.", "tools": TOOLS,
     "chosen": {"from": "gpt", "value": "18 °C in Lima."}, "rejected": {"from": "gpt", "value": "It is snowing."}},
    {"conversations": [{"from": "human", "value": "Weather in Lima and Cusco?"}], "system": None, "tools": TOOLS,
     "chosen": {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Lima"}},
                                                              {"name": "get_weather", "arguments": {"city": "Cusco"}}])},
     "rejected": {"from": "gpt", "value": "Sunny everywhere."}},
    {"conversations": [{"from": "narrator", "value": "Once upon a time."}], "system": None, "tools": TOOLS,
     "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."}},
    {"conversations": [{"from": "human", "value": "Weather?"}], "system": None, "tools": TOOLS,
     "chosen": {"from": "function_call", "value": "get_weather(Lima)"}, "rejected": {"from": "gpt", "value": "No."}},
]
QWEN_IMPLICIT = [
    {"chosen": [system("Be brief."), user("Capital of Peru?"), assistant("Lima.")],
     "rejected": [system("Be brief."), user("Capital of Peru?"), assistant("Cusco, I believe.")]},
    {"chosen": [user("2+2?"), assistant("4."), user("And 3+3?"), assistant("6.")],
     "rejected": [user("2+2?"), assistant("4."), user("And 3+3?"), assistant("7.")]},
    {"chosen": [user("Say hi."), assistant("Hi!")],  # chosen a prefix of the rejected conversation
     "rejected": [user("Say hi."), assistant("Hi!"), user("Again."), assistant("No.")]},
    {"chosen": [user("Explain gradient descent."), assistant(LONG_ANSWER)],
     "rejected": [user("Explain gradient descent."), assistant("It goes down.")]},
]
QWEN_TEXT = [
    {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "中文：天空是什么颜色？\n回答：", "chosen": "蓝色。", "rejected": "绿色。"},
    {"prompt": "The capital of Fra", "chosen": "nce is Paris.", "rejected": "nce is Berlin.<|im_end|>"},
    {"prompt": "Explain gradient descent.", "chosen": " " + LONG_ANSWER, "rejected": " No."},
    {"prompt": "Say bye.", "chosen": " Bye.", "rejected": " Bye.<|im_end|>"},  # item 5: identical once tokenized
]
# ------------------------------------------------------------------ rows: Llama 3.2 (no chat template)

LLAMA_TEXT = [
    {"prompt": "Question: what is the capital of Peru?\nAnswer:", "chosen": " Lima.", "rejected": " Cusco.",
     "system": "Answer in one word."},
    {"prompt": "Traduire en anglais : « Où est la gare ? »\n", "chosen": "Where is the station?",
     "rejected": "Where is the car?", "system": None},
    {"prompt": "Explain gradient descent.", "chosen": " " + LONG_ANSWER, "rejected": " It goes down.", "system": None},
    {"prompt": "Emoji check 🌊🐍: name the animal.", "chosen": " A snake.", "rejected": " A wave.", "system": None},
    {"prompt": "Count: 1 2 3 4", "chosen": " 5 6", "rejected": " 7 8 9", "system": "Continue the sequence."},
]
LLAMA_IMPLICIT = [
    {"chosen": "The answer is 42", "rejected": "The answer is 4"},
    {"chosen": "Q: Is the sky blue? A: Yes, on a clear day.", "rejected": "Q: Is the sky blue? A: No, it is green."},
    {"chosen": "Résumé : la mer est calme.", "rejected": "Résumé : la mer est agitée."},
    {"chosen": "Explain gradient descent." + LONG_ANSWER, "rejected": "Explain gradient descent. It goes down."},
]
LLAMA_SEVERAL = [  # K = 2 rejected answers (no TRL counterpart: log-probs only)
    {"prompt": "Capital of Peru?", "chosen": " Lima.", "rejected": [" Cusco.", " Quito."]},
    {"prompt": "2+2=", "chosen": "4", "rejected": ["5", "22"]},
]


# ------------------------------------------------------------------ TRL's format, written here independently

def trl_message(message: dict) -> dict:
    """A message as TRL users write it for a chat template: ShareGPT speakers as roles (a function_call as an
    assistant tool call, an observation as a tool message), and "" for the content of a tool-call message (Qwen3's
    template needs a string; transformers drops null keys)."""
    if "from" in message:
        if message["from"] == "function_call":
            calls = json.loads(message["value"])
            calls = [{"type": "function", "function": c} for c in (calls if isinstance(calls, list) else [calls])]
            return assistant("", tool_calls=calls)
        return {"role": SHAREGPT_SPEAKERS[message["from"]], "content": message["value"]}
    return {**message, "content": message.get("content") or ""} if message.get("tool_calls") else message


def trl_row(row: dict, run_kwargs: dict) -> dict:
    """The same row as TRL takes it: messages, the system prompt as TRL users write it, options merged."""
    out = {k: v for k, v in row.items() if k in ("prompt", "chosen", "rejected")}
    out["tools"] = row.get("tools")  # every row has every column: Dataset.from_list takes the first row's keys
    if "conversations" in row:
        out["prompt"] = row["conversations"]
        out["chosen"], out["rejected"] = [row["chosen"]], [row["rejected"]]
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(out.get(key), list):
            out[key] = [trl_message(m) for m in out[key]]
    if row.get("system"):
        out["prompt"] = [system(row["system"]), *out["prompt"]] if isinstance(out["prompt"], list) else f"{row['system']}\n\n{out['prompt']}"
    out["chat_template_kwargs"] = {**run_kwargs, **(row.get("chat_template_kwargs") or {})}
    return out


def trl_token_ids(model, tokenizer, rows: dict[int, dict], max_length, truncation_mode, output_dir) -> dict[int, tuple]:
    """{row: (prompt_ids, chosen_ids, rejected_ids)} from TRL 1.16's DPOTrainer dataset preparation."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = {i: {**row, ROW: i} for i, row in rows.items()}
    if not any(row["chat_template_kwargs"] for row in rows.values()):  # Arrow has no struct without fields
        rows = {i: {k: v for k, v in row.items() if k != "chat_template_kwargs"} for i, row in rows.items()}
    # Iterable: TRL tokenizes lazily, and datasets does not hash the 150k-token tokenizer to fingerprint each map.
    dataset = Dataset.from_list(list(rows.values())).to_iterable_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # keep_end is deprecated in TRL (still supported)
        args = DPOConfig(output_dir=str(output_dir), max_length=max_length, truncation_mode=truncation_mode,
                         report_to=[], use_cpu=True, bf16=False, save_strategy="no", dataloader_num_workers=0,
                         max_steps=1)  # an iterable dataset has no length; nothing is trained
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return {e[ROW]: (list(e["prompt_ids"]), list(e["chosen_ids"]), list(e["rejected_ids"])) for e in trainer.train_dataset}


# ------------------------------------------------------------------ exact log-probs

def window(ids: list[int], mask: list[int], max_length, mode) -> tuple[list[int], list[int]]:
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    return (ids[:max_length], mask[:max_length]) if mode == "keep_start" else (ids[-max_length:], mask[-max_length:])


def torch_logps(model, prompt_ids, completion_ids, max_length, mode) -> float:
    """Sum of log p(token | prefix) over the scored completion tokens of one truncated sequence, computed in the
    model's dtype throughout, as TRL does (the LM head only where a token is scored: same values, less work)."""
    import torch

    ids, mask = window(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids), max_length, mode)
    scored = torch.tensor(mask[1:], dtype=torch.bool)
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, :-1][scored]
        logps = torch.log_softmax(model.lm_head(hidden), dim=-1)
        picked = logps.gather(-1, torch.tensor(ids[1:])[scored][:, None])[:, 0]
    return float(picked.sum())


@pytest.fixture(scope="module")
def torch_models():
    """get(model dir, "float64" | "float32" | "tokenizer"): the torch model or the tokenizer, loaded once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {}

    def get(model_dir, kind):
        key = (str(model_dir), kind)
        if key not in loaded:
            loaded[key] = AutoTokenizer.from_pretrained(str(model_dir)) if kind == "tokenizer" else (
                AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, kind),
                                                     attn_implementation="eager").eval())
        return loaded[key]

    return get


def check_logps(cache_rows: dict, model_dir, max_length, mode, torch_models) -> None:
    """Every cached sum is within twice the error of a plain float32 torch forward of the same ids (the largest
    over these sequences) from the exact float64 sum, plus one float32 ulp of the sum: the cache stores float32,
    so a sum of -627 cannot be nearer than 3e-5 (a lucky torch rounding can be)."""
    import numpy as np

    exact, single = torch_models(model_dir, "float64"), torch_models(model_dir, "float32")
    scored = []  # (cached value, exact value, float32 torch value)
    for row in cache_rows.values():
        several = isinstance(row["rejected_ids"][0], list)
        answers = [(row["chosen_ids"], row["ref_chosen_logps"])] + list(zip(
            row["rejected_ids"] if several else [row["rejected_ids"]],
            row["ref_rejected_logps"] if several else [row["ref_rejected_logps"]]))
        for ids, cached_value in answers:
            args = (row["prompt_ids"], ids, max_length, mode)
            scored.append((cached_value, torch_logps(exact, *args), torch_logps(single, *args)))
    torch_err = max(abs(single_value - truth) for _, truth, single_value in scored)
    ours_err = max(abs(cached_value - truth) for cached_value, truth, _ in scored)
    print(f"max |cache - float64| {ours_err:.2e}, max |float32 torch - float64| {torch_err:.2e}")
    assert torch_err > 0, "the float32 forward equals float64 exactly: the comparison could not fail"
    for cached_value, truth, _ in scored:
        assert abs(cached_value - truth) <= 2 * torch_err + np.spacing(np.float32(abs(truth))), (cached_value, truth, torch_err)


# ------------------------------------------------------------------ the runs

def precompute(model_dir, rows, out, max_length, mode, *flags):
    data = out.parent / (out.name + ".jsonl")
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    argv = ["precompute", "--model", model_dir, "--data", data, "--out", out, "--max-length", max_length,
            "--truncation-mode", mode, "--tokens-per-batch", 2048, *flags]
    result = CliRunner().invoke(cli, [str(a) for a in argv], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pq.read_table(sorted((out / "train").glob("part-*.parquet")))
    rejects = {r["index"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    return {r["index"]: r for r in table.to_pylist()}, rejects, result.output


# One TRL run per group (a TRL dataset has one format; its tokenizer is hashed once per run): files of rows with
# their run options and the reasons we reject rows for (by design, or a prompt that fills max_length as TRL's filter).
GROUPS = {  # name: (model fixture, max_length, truncation mode, {file: (rows, run options, expected rejects)})
    "qwen3-chat": ("qwen3_model", 176, "keep_start", {
        "conversational": (QWEN_CONVERSATIONAL, {"enable_thinking": False}, {7: "missing prompt"}),
        "sharegpt": (QWEN_SHAREGPT, {}, {})}),
    "qwen3-tools": ("qwen3_model", 256, "keep_start", {
        "tool-calls": (QWEN_TOOL_CALLS, {}, {3: "chosen message 1 has neither string content nor tool calls",
                                             4: "prompt message 3 has neither string content nor tool calls"}),
        "sharegpt": (QWEN_SHAREGPT_TOOLS, {}, {2: "unknown ShareGPT speaker 'narrator'",
                                               3: "function_call value is not valid JSON"})}),
    "qwen3-implicit": ("qwen3_model", 64, "keep_start", {"implicit": (QWEN_IMPLICIT, {}, {})}),
    "qwen3-text": ("qwen3_model", 48, "keep_end", {
        "text": (QWEN_TEXT, {}, {4: "chosen identical to rejected after tokenization"})}),
    "llama32-text": ("llama32_model", 40, "keep_start", {"text": (LLAMA_TEXT, {}, {})}),
    "llama32-implicit": ("llama32_model", 24, "keep_end", {"implicit": (LLAMA_IMPLICIT, {}, {})}),
}


@pytest.mark.parametrize("group", GROUPS)
def test_real_tokenizer_ids_match_trl_and_logps_are_exact(group, request, tmp_path, torch_models):
    fixture, max_length, mode, files = GROUPS[group]
    model_dir = request.getfixturevalue(fixture)
    ours, trl_rows, outputs = {}, {}, {}
    for name, (rows, run_kwargs, expected_rejects) in files.items():
        flags = ["--chat-template-kwargs", json.dumps(run_kwargs)] if run_kwargs else []
        cached, rejects, outputs[name] = precompute(model_dir, rows, tmp_path / name, max_length, mode, *flags)
        assert {i: reason.split(" (")[0] for i, reason in rejects.items()} == expected_rejects, name
        assert sorted(cached) == sorted(set(range(len(rows))) - set(rejects)), name
        check_logps(cached, model_dir, max_length, mode, torch_models)
        ours.update({(name, i): row for i, row in cached.items()})
        # TRL gets every row but those we reject by design (it would crash on them, or train a zero signal).
        trl_rows.update({(name, i): trl_row(row, run_kwargs) for i, row in enumerate(rows)
                         if i not in rejects or rejects[i].startswith("prompt fills max_length")})

    keys = sorted(trl_rows)
    trl = trl_token_ids(torch_models(model_dir, "float32"), torch_models(model_dir, "tokenizer"),
                        {k: trl_rows[key] for k, key in enumerate(keys)}, max_length, mode, tmp_path / "trl")
    trl = {keys[k]: value for k, value in trl.items()}
    assert sorted(trl) == sorted(ours), "TRL dropped other rows (a prompt filling max_length)"
    for key, row in ours.items():
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == trl[key], key
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in ours.values())
    assert longest > max_length, "no row is truncated"
    if group == "qwen3-chat":  # thinking off: the template's empty thought before a reasoning answer is dropped
        assert "format: conversational" in outputs["conversational"]
        assert "prompt tail dropped: 1 rows" in outputs["conversational"], outputs["conversational"]
        assert "format: sharegpt" in outputs["sharegpt"]


def test_several_rejected_logps_are_exact(request, tmp_path, torch_models):
    model_dir = request.getfixturevalue("llama32_model")
    ours, rejects, _ = precompute(model_dir, LLAMA_SEVERAL, tmp_path / "cache", 32, "keep_start")
    assert not rejects and sorted(ours) == [0, 1]
    check_logps(ours, model_dir, 32, "keep_start", torch_models)


def test_conversational_rows_need_a_chat_template(request, tmp_path):
    model_dir = request.getfixturevalue("llama32_model")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": [user("Hi")], "chosen": [assistant("Hello.")], "rejected": [assistant("Bye.")]}) + "\n")
    result = CliRunner().invoke(cli, ["precompute", "--model", str(model_dir), "--data", str(data),
                                      "--out", str(tmp_path / "cache")], catch_exceptions=False)
    assert result.exit_code == 1
    assert "none of its 1 rows could be cached (1 conversational row, but the tokenizer has no chat template)" in result.output
