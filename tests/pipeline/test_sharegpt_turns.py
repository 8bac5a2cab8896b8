"""ShareGPT rows ({from, value} messages) follow LLaMA-Factory's turn order, as its SharegptDatasetConverter
checks it (a row that breaks it is dropped there with a warning): after an optional first system turn, turns
alternate human/observation and gpt/function_call, the prompt ends on a human or observation turn, and each
answer is a gpt or function_call turn. A row that breaks it is a reject naming the field, the turn and its
speaker, never a conversation the chat template renders otherwise than written (a chosen answer spoken by
`human`, an answer after an assistant turn). {role, content} rows keep TRL's rule: none (TRL renders them as
written, e.g. a prompt ending on an assistant turn)."""

import json

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
}

BROKEN = {  # (row, reason): each kind of break
    "prompt ends on gpt": (row("human", "gpt"), "conversations[1] 'gpt' ends the prompt: ShareGPT answers follow a human or observation turn"),
    "prompt ends on function_call": (row("system", "human", "function_call"),
                                     "conversations[2] 'function_call' ends the prompt: ShareGPT answers follow a human or observation turn"),
    "prompt starts on gpt": (row("gpt", "human"), f"conversations[0] is 'gpt', not a human or observation turn ({ORDER})"),
    "two human turns": (row("system", "human", "human"), f"conversations[2] is 'human', not a gpt or function_call turn ({ORDER})"),
    "observation after human": (row("human", "observation"), f"conversations[1] is 'observation', not a gpt or function_call turn ({ORDER})"),
    "system turn not first": (row("human", "gpt", "system", "human"), f"conversations[2] is 'system', not a human or observation turn ({ORDER})"),
    "only a system turn": (row("system"), "conversations has no human turn for the answers to follow"),
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
