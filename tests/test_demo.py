"""The embedded demo builds offline, deterministically, and loads with mlx-lm."""

import hashlib
import json
import math
from pathlib import Path

import pytest

from mlx_dpo import demo


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, *demo.build_demo(root)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_is_deterministic(built, tmp_path):
    root, _, _ = built
    demo.build_demo(tmp_path)
    assert _digest(tmp_path) == _digest(root)


def test_complete_build_is_not_rebuilt(built):
    root, model_dir, _ = built
    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert demo.build_demo(root) == (model_dir, root / "data")
    assert weights.stat().st_mtime_ns == mtime


def test_data_splits_are_disjoint_and_eos_free(built):
    _, _, data_dir = built
    train, valid = _rows(data_dir / "train.jsonl"), _rows(data_dir / "valid.jsonl")
    assert 1000 <= len(train) <= 2000 and 100 <= len(valid) <= 200
    for row in train + valid:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        assert "</s>" not in row["chosen"] + row["rejected"]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in valid}


def test_mlx_lm_loads_model_and_tokenizer(built):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    _, model_dir, data_dir = built
    model, wrapper = load(str(model_dir))
    tokenizer = wrapper._tokenizer
    row = _rows(data_dir / "valid.jsonl")[0]
    ids = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids

    messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": "ok"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<s>") and text.rstrip().endswith("ok</s>")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)

    x = mx.array([ids])
    loss = nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="mean").item()
    assert abs(loss - math.log(len(tokenizer))) < 0.5  # near-uniform random init
