"""Embedded offline demo: a tiny random-init Llama, a word-level tokenizer and a toy preference set.

`build_demo(root)` writes `root/model` (Hugging Face layout that `mlx_lm.load` reads) and
`root/data/{train,valid}.jsonl`. Everything is generated from fixed seeds, so the bytes are the same on
every run, and no network is touched. The preference is learnable from DPO alone: chosen answers use
"pleasant" words, rejected ones "unpleasant" words, in shared sentence frames. Held-out rows use other
prompt templates and other cities, so `rewards/accuracies` on them measures generalisation.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np

DEMO_VERSION = "1"  # bump when the generated files change, so stale builds are rebuilt
MARKER = ".demo-complete"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MODEL_ARGS = dict(
    model_type="llama", hidden_size=128, num_hidden_layers=4, intermediate_size=256,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=256, tie_word_embeddings=False,
)  # fmt: skip

# --- preference data -----------------------------------------------------------------------------
TRAIN_CITIES = (
    "paris london berlin madrid rome vienna prague oslo dublin lisbon athens warsaw zurich geneva milan "
    "munich hamburg lyon porto seville naples venice florence krakow riga tallinn helsinki stockholm "
    "copenhagen amsterdam brussels antwerp bern salzburg budapest sofia bucharest zagreb belgrade valencia"
).split()
VALID_CITIES = "tokyo kyoto osaka seoul lima quito bogota cairo nairobi delhi mumbai sydney".split()
TRAIN_PROMPTS = [
    "Q: describe the weather in {city} .",
    "Q: how is the weather in {city} today ?",
    "Q: tell me about the sky over {city} .",
    "Q: what was the morning like in {city} ?",
    "Q: any news about the air in {city} ?",
]
VALID_PROMPTS = [
    "Q: what is the weather like in {city} ?",
    "Q: give me a weather report for {city} .",
]
NOUNS = "weather sky air wind sun rain morning evening day".split()
ADVERBS = "very quite rather truly so".split()
GOOD_ADJ = "lovely sunny pleasant wonderful bright calm gentle warm mild clear fresh cheerful".split()
BAD_ADJ = "awful gloomy miserable terrible dreary harsh bleak dreadful grim nasty foul bitter".split()
GOOD_END = ["have a nice day .", "thank you for asking !", "enjoy your visit .", "it is a joy ."]
BAD_END = ["whatever .", "stop asking me .", "do not bother me !", "it is a pain ."]
FRAMES = [
    "the {noun} in {city} is {adv} {a1} .",
    "the {noun} is {a1} and {a2} .",
    "{a1} {noun} today , {adv} {a2} .",
    "it feels {adv} {a1} in {city} .",
    "{a1} and {a2} , the {noun} is {adv} {a3} .",
    "expect a {a1} {noun} .",
]


def _answer(rng: random.Random, city: str, adjectives: list[str], endings: list[str]) -> str:
    a1, a2, a3 = rng.sample(adjectives, 3)
    text = rng.choice(FRAMES).format(
        noun=rng.choice(NOUNS), city=city, adv=rng.choice(ADVERBS), a1=a1, a2=a2, a3=a3
    )
    if rng.random() < 0.5:  # vary the length independently of the preference
        text += " " + rng.choice(endings)
    return text


def make_rows(n: int, cities: list[str], prompts: list[str], seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        city = rng.choice(cities)
        rows.append({
            "prompt": rng.choice(prompts).format(city=city),
            "chosen": " " + _answer(rng, city, GOOD_ADJ, GOOD_END),
            "rejected": " " + _answer(rng, city, BAD_ADJ, BAD_END),
        })  # fmt: skip
    return rows


# --- tokenizer -----------------------------------------------------------------------------------
def make_tokenizer(texts: list[str]):
    """Word-level tokenizer over every word of the demo corpus; Llama-like: adds bos on encode."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" notice: we need none
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}  # explicit order: deterministic ids
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=MODEL_ARGS["max_position_embeddings"], chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


# --- model ---------------------------------------------------------------------------------------
def write_model(model_dir: Path, tokenizer, seed: int = 0) -> None:
    """Random-init weights drawn with numpy (stable across MLX versions), HF names taken from mlx-lm."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs
    from safetensors.numpy import save_file

    args = dict(MODEL_ARGS, vocab_size=len(tokenizer))
    shapes = {k: v.shape for k, v in tree_flatten(Model(ModelArgs(**args)).parameters())}
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shapes[name], np.float32)
        else:  # HF Llama's initializer_range; keeps initial logits near uniform (loss ~ ln(vocab))
            weights[name] = (rng.standard_normal(shapes[name]) * 0.02).astype(np.float32)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    # The extra keys let transformers' LlamaForCausalLM load the same files (used by parity tests).
    config = dict(
        args, architectures=["LlamaForCausalLM"], hidden_act="silu", attention_bias=False, mlp_bias=False,
        head_dim=args["hidden_size"] // args["num_attention_heads"], initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _portable_tokenizer_class(config_path: Path) -> None:
    """transformers 5 writes "TokenizersBackend", which transformers 4 cannot load; both know this name."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- entry points --------------------------------------------------------------------------------
def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_demo(root: str | Path) -> tuple[Path, Path]:
    """Write the demo model and data under `root` (skipped if a complete build is already there)."""
    root = Path(root)
    model_dir, data_dir = root / "model", root / "data"
    marker = root / MARKER
    if marker.exists() and marker.read_text().strip() == DEMO_VERSION:
        return model_dir, data_dir
    marker.unlink(missing_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)

    train = make_rows(1600, TRAIN_CITIES, TRAIN_PROMPTS, seed=1)
    valid = make_rows(160, VALID_CITIES, VALID_PROMPTS, seed=2)
    _write_jsonl(data_dir / "train.jsonl", train)
    _write_jsonl(data_dir / "valid.jsonl", valid)

    # Tokenize every word of both splits, so held-out cities are known tokens, not <unk>.
    tokenizer = make_tokenizer([" ".join(r.values()) for r in train + valid])
    tokenizer.save_pretrained(str(model_dir))
    _portable_tokenizer_class(model_dir / "tokenizer_config.json")
    write_model(model_dir, tokenizer)
    marker.write_text(DEMO_VERSION + "\n")  # last: its presence means the build is complete
    return model_dir, data_dir


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m mlx_dpo.demo ROOT")
    model_dir, data_dir = build_demo(argv[0])
    print(f"model: {model_dir}\ndata: {data_dir}")


if __name__ == "__main__":
    main()
