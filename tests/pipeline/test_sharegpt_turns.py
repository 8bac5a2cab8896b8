"""ShareGPT rows ({from, value} messages) follow LLaMA-Factory's turn order, as its SharegptDatasetConverter
checks it (a row that breaks it is dropped there with a warning): after an optional first system turn, turns
alternate human/observation and gpt/function_call, the prompt ends on a human or observation turn, and each
answer is a gpt or function_call turn (a list answer begins and ends on one). A row that breaks it is a reject naming the field, the turn and its
speaker, never a conversation the chat template renders otherwise than written (a chosen answer spoken by
`human`, an answer after an assistant turn). {role, content} rows keep TRL's rule: none (TRL renders them as
written, e.g. a prompt ending on an assistant turn)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.pipeline.encode import RowRejected
from mlx_dpo.pipeline.formats import Fields, normalize

ORDER = "ShareGPT's turn order: an optional system turn, then human/observation and gpt/function_call in turn"
CALL = '{"name": "get_weather", "arguments": {"city": "Lima"}}'


def turns(*speakers):
    return [{"from": s, "value": f"turn {i}" if s != "function_call" else CALL} for i, s in enumerate(speakers)]


def row(*speakers, chosen="gpt", rejected="gpt"):
    return {"conversations": turns(*speakers), "chosen": turns(chosen)[0], "rejected": turns(rejected)[0] | {"value": "no"}}


def reason(raw):
    """normalize's reason for rejecting the row (its prompt the `prompt` or `conversations` column, else
    implicit), or None when it reads the row."""
    fields = Fields(prompt=next((c for c in ("prompt", "conversations") if c in raw), None))
    try:
        normalize(raw, fields)
    except RowRejected as error:
        return str(error)
    return None


VALID = {  # rows LLaMA-Factory reads
    "system, human": row("system", "human"),
    "multi-turn": row("system", "human", "gpt", "human"),
    "tool call and result, then an answer": row("system", "human", "function_call", "observation"),
    "answer is a tool call": row("human", "function_call", "observation", chosen="function_call"),
    "TRL's names for the speakers": row("system", "user", "assistant", "user", chosen="assistant"),
    "tool after an assistant tool call": row("user", "function_call", "tool"),
    "K answers, each a message list": {"conversations": turns("human"), "chosen": turns("gpt"),
                                       "rejected": [turns("gpt"), turns("function_call")]},
    "implicit prompt": {"chosen": turns("human", "gpt", "human", "gpt"),
                        "rejected": turns("human", "gpt", "human") + [{"from": "gpt", "value": "no"}]},
    "answer is a tool round trip": {"conversations": turns("human"), "chosen": turns("function_call", "observation", "gpt"),
                                    "rejected": turns("gpt")},
}
ANSWER_END = "ends the answer: a ShareGPT answer ends on a gpt or function_call turn"
NO_HUMAN = "conversations has no human turn for the answers to follow"

BROKEN = {  # (row, reason): each kind of break
    "prompt ends on gpt": (row("human", "gpt"), "conversations[1] 'gpt' ends the prompt: ShareGPT answers follow a human or observation turn"),
    "prompt ends on function_call": (row("system", "human", "function_call"),
                                     "conversations[2] 'function_call' ends the prompt: ShareGPT answers follow a human or observation turn"),
    "prompt starts on gpt": (row("gpt", "human"), f"conversations[0] is 'gpt', not a human or observation turn ({ORDER})"),
    "two human turns": (row("system", "human", "human"), f"conversations[2] is 'human', not a gpt or function_call turn ({ORDER})"),
    "observation after human": (row("human", "observation"), f"conversations[1] is 'observation', not a gpt or function_call turn ({ORDER})"),
    "system turn not first": (row("human", "gpt", "system", "human"), f"conversations[2] is 'system', not a human or observation turn ({ORDER})"),
    "only a system turn": (row("system"), NO_HUMAN),
    "empty conversations and a system column": (row() | {"system": "Be brief."}, NO_HUMAN),
    "chosen, a list, ends on human": ({"conversations": turns("human"), "chosen": turns("gpt", "human"), "rejected": turns("gpt")},
                                      f"chosen[1] 'human' {ANSWER_END}"),
    "rejected, a list, ends on observation": ({"conversations": turns("human"), "chosen": turns("gpt"),
                                               "rejected": turns("function_call", "observation")},
                                              f"rejected[1] 'observation' {ANSWER_END}"),
    "chosen spoken by human": (row("human", chosen="human"), f"chosen is 'human', not a gpt or function_call turn ({ORDER})"),
    "rejected spoken by observation": (row("human", rejected="observation"), f"rejected is 'observation', not a gpt or function_call turn ({ORDER})"),
    "rejected spoken by system": (row("human", rejected="system"), f"rejected is 'system', not a gpt or function_call turn ({ORDER})"),
    "chosen, a list, speaks twice": ({"conversations": turns("human"), "chosen": turns("gpt", "gpt"), "rejected": turns("gpt")},
                                     f"chosen[1] is 'gpt', not a human or observation turn ({ORDER})"),
    "one of K answers spoken by user": ({"conversations": turns("human"), "chosen": turns("gpt"),
                                         "rejected": [turns("gpt"), turns("user")]},
                                        f"rejected[1][0] is 'user', not a gpt or function_call turn ({ORDER})"),
    "implicit prompt ends on gpt": ({"chosen": turns("human", "gpt", "gpt"), "rejected": turns("human", "gpt", "function_call")},
                                    "chosen[1] 'gpt' ends the prompt: ShareGPT answers follow a human or observation turn"),
    "implicit answer ends on human": ({"chosen": turns("human", "gpt", "human"), "rejected": turns("human", "function_call")},
                                      f"chosen[2] 'human' {ANSWER_END}"),
}


@pytest.mark.parametrize("name", VALID)
def test_rows_in_llamafactory_order_are_read(name):
    raw = VALID[name]
    assert reason(raw) is None


@pytest.mark.parametrize("name", BROKEN)
def test_each_break_of_the_order_is_a_reject_naming_field_turn_and_speaker(name):
    raw, expected = BROKEN[name]
    assert reason(raw) == expected


def test_role_content_rows_keep_trls_rule():
    """The same shapes in {role, content} form go to the chat template as TRL sends them."""
    def msgs(*roles):
        return [{"role": r, "content": f"turn {i}"} for i, r in enumerate(roles)]

    for prompt in (msgs("user", "assistant"), msgs("assistant", "user"), msgs("user", "user"), msgs("user", "system", "user")):
        assert reason({"prompt": prompt, "chosen": msgs("assistant"), "rejected": [{"role": "assistant", "content": "no"}]}) is None


def test_precompute_caches_ordered_rows_and_rejects_the_rest_with_reasons(tiny_model_dir, tmp_path):
    """Through `mlx-dpo precompute`: every row cached or in rejects.jsonl with its reason; a prompt ending on an
    assistant turn in {role, content} form is cached (TRL's rule), the same row in ShareGPT form is not."""
    roles = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
             "chosen": [{"role": "assistant", "content": "How can I help?"}], "rejected": [{"role": "assistant", "content": "Bye."}]}
    valid = [VALID[name] for name in ("system, human", "multi-turn", "tool call and result, then an answer", "answer is a tool call")]
    broken = [BROKEN[name] for name in ("prompt ends on gpt", "chosen spoken by human", "system turn not first",
                                        "observation after human")]
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", [r for r, _ in broken[:2]] + valid + [r for r, _ in broken[2:]])
    out = tmp_path / "c"
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", out, "--max-length", 64)
    assert result.exit_code == 0, result.output
    assert "format: sharegpt" in result.output
    cached = pq.read_table(sorted((out / "train").glob("part-*.parquet")))["index"].to_pylist()
    rejects = {r["index"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert sorted(cached) == [2, 3, 4, 5]
    assert rejects == {0: broken[0][1], 1: broken[1][1], 6: broken[2][1], 7: broken[3][1]}

    data = tiny_models.write_jsonl(tmp_path / "roles.jsonl", [roles])
    result = tiny_models.invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert pq.read_table(sorted((tmp_path / "r" / "train").glob("part-*.parquet")))["index"].to_pylist() == [0]


def precompute(tmp_path, model_dir, rows, suffix="jsonl") -> tuple[list[int], dict[int, str]]:
    """(cached indices, {rejected index: reason}) of `mlx-dpo precompute` on `rows` (JSONL, or Parquet: Arrow
    gives every message the keys of all of them, as null); a traceback fails the test."""
    data = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        tiny_models.write_jsonl(data, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / f"c-{suffix}"
    result = tiny_models.invoke_cli("precompute", "--model", model_dir, "--data", data, "--out", out, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    cached = pq.read_table(sorted((out / "train").glob("part-*.parquet")))["index"].to_pylist()
    rejects = (out / "rejects.jsonl").read_text().splitlines() if (out / "rejects.jsonl").exists() else []
    return sorted(cached), {r["index"]: r["reason"] for r in map(json.loads, rejects)}


def systems(raw, prompt) -> list[str]:
    row, _ = normalize(raw, Fields(prompt=prompt))
    return [m["content"] for m in row["prompt"] if m["role"] == "system"]


@pytest.mark.parametrize("form", ["sharegpt", "role/content"])
@pytest.mark.parametrize("prompt", ["conversations", None])  # the prompt column, or an implicit prompt
def test_a_first_system_message_wins_over_the_system_column(form, prompt):
    """LLaMA-Factory's converter takes a first system turn as the system prompt and reads the `system` column only
    without one: one system message, never the column's and then the turn's (a chat template renders two, or
    raises). {role, content} rows share the rule (the same code adds the column); without a first system message
    the column is still the system message."""
    def message(speaker, text):
        role = {"human": "user", "gpt": "assistant"}.get(speaker, speaker)
        return {"from": speaker, "value": text} if form == "sharegpt" else {"role": role, "content": text}

    for first in ([message("system", "Be brief.")], []):
        question = [*first, message("human", "Capital of Peru?")]
        lima, cusco = message("gpt", "Lima."), message("gpt", "Cusco.")
        if prompt is None:  # whole conversations
            raw = {"chosen": [*question, lima], "rejected": [*question, cusco]}
        else:
            raw = {"conversations": question, "chosen": lima, "rejected": cusco}
        expected = ["Be brief."] if first else ["Answer in French."]
        assert systems({**raw, "system": "Answer in French."}, prompt) == expected


def test_empty_conversations_with_a_system_column_is_the_no_human_turn_reject(tiny_model_dir, tmp_path):
    """An empty ShareGPT prompt with a `system` column would be a prompt of a lone system message: the same reject
    as the prompt written as a lone system turn (LLaMA-Factory drops both), through `mlx-dpo precompute`."""
    answers = {"chosen": turns("gpt")[0], "rejected": {"from": "gpt", "value": "no"}}
    rows = [{"conversations": turns("system"), "system": "", **answers},
            {"conversations": [], "system": "Be brief.", **answers},
            {"conversations": turns("human"), "system": "Be brief.", **answers}]
    assert precompute(tmp_path, tiny_model_dir, rows) == ([2], {0: NO_HUMAN, 1: NO_HUMAN})


MIXED = [  # messages with keys of both forms: ShareGPT only with both `from` and `value` set
    {"role": "user", "content": "Q?", "from": "human"},  # {role, content} with a stray `from`: read as written
    {"from": "human", "value": "Q?", "role": "assistant", "content": "other"},  # from/value give role and content
    {"role": "user", "content": "Q?", "value": "V"},  # {role, content} with a stray `value`
    {"from": "human", "content": "Q?"}, {"role": "user", "value": "Q?"},  # neither form: rejects
    {"from": "human", "value": None}, {"from": None, "value": "Q?"},
]


def test_a_message_is_sharegpt_only_with_both_from_and_value():
    """One rule for reading, checking and naming the speaker: {from, value} set -> ShareGPT (its role and content
    from them, as TRL's maybe_convert_to_chatml and LLaMA-Factory read them), else {role, content} as TRL reads it."""
    answers = {"chosen": turns("gpt")[0], "rejected": {"from": "gpt", "value": "no"}}
    prompts = [normalize({"conversations": [m], **answers}, Fields(prompt="conversations"))[0]["prompt"] for m in MIXED[:3]]
    assert prompts == [[MIXED[0]], [{"role": "user", "content": "Q?"}], [MIXED[2]]]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_a_message_mixing_both_forms_is_cached_or_a_reject_never_a_traceback(tiny_model_dir, tmp_path, suffix):
    """Bad input is a reject with its reason: before, a {role, content} message with a `from` key (no `value`)
    was taken for ShareGPT and precompute stopped on a KeyError."""
    answers = {"chosen": turns("gpt")[0], "rejected": {"from": "gpt", "value": "no"}}
    cached, rejects = precompute(tmp_path, tiny_model_dir, [{"conversations": [m], **answers} for m in MIXED], suffix)
    assert cached == [0, 1, 2] and sorted(rejects) == [3, 4, 5, 6], (cached, rejects)
    assert all(rejects.values())
