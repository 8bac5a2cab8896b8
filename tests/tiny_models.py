"""Deterministic, offline builders for a tiny Llama-like model, its tokenizer and small preference data.

Nothing here downloads anything. torch / transformers / tokenizers are imported inside the functions so that
importing this module (from conftest) does not load torch before `mlx_dpo` has set up OpenBLAS.

The same directory is loadable by `transformers` (torch) and by `mlx_lm.load` (MLX), so the reference log-probs
TRL computes with torch can be compared with what our MLX precompute writes.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Role-tagged turns; assistant turns end with eos; `add_generation_prompt` opens an assistant turn. The bos token
# comes from the template, because `apply_chat_template` tokenizes with add_special_tokens=False.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model assigns a probability to every sequence of tokens.",
    "Preference optimization compares a chosen answer with a rejected answer.",
    "The reference model is frozen and its log probabilities are computed once.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Two plus two is four. Three times three is nine.",
    "Please answer the question briefly and politely.",
    "I do not know the answer to that question.",
    "Once upon a time there was a small robot who loved to read books.",
    "The weather today is sunny with a light breeze from the west.",
    "Cats sleep most of the day and hunt at night.",
    "Translate the sentence into French: good morning, my friend.",
    "Bonjour, mon ami. Merci beaucoup.",
    "Write a short poem about the sea and the moon.",
    "The sea is deep and the moon is bright above the waves.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "You are a helpful assistant. Answer in one sentence.",
    "Summarize the story in a few words, please.",
    "Tokens merge across word boundaries when spaces are attached to words.",
]


# --------------------------------------------------------------------------------------------------- data


def identity_fields(**changes) -> dict:
    """A complete set of cache identity fields for hand-built manifests (readers refuse one lacking a field)."""
    from mlx_dpo.schemas import SCHEMA_VERSION
    from mlx_dpo.schemas.identity import TOKENIZATION_RULES

    fields = {"schema_version": SCHEMA_VERSION, "reference_weights": "ef" * 32, "dtype": "float32",
              "tokenizer": "cd" * 32, "tokenization_rules": TOKENIZATION_RULES, "data": {}, "options": {}}
    return {**fields, **changes}


def standard_rows() -> list[dict]:
    """~12 prompt/chosen/rejected string rows of varied lengths.

    Some prompts end mid-word ("capital of Fra" + "nce") or with a trailing space, so that the tokenized prompt is
    not a prefix of the tokenized prompt+completion (byte-level BPE attaches the space to the next word).
    """
    return [
        {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " four.", "rejected": " five."},
        {"prompt": "The capital of Fra", "chosen": "nce is Paris.", "rejected": "nce is Berlin."},
        {"prompt": "Answer: ", "chosen": "yes", "rejected": "no, I do not know the answer to that question."},
        {"prompt": "Hi", "chosen": " there!", "rejected": "."},
        {
            "prompt": "Once upon a time there was a small robot who loved to read books. One day the robot",
            "chosen": " found a book about the sea and the moon.",
            "rejected": " slept.",
        },
        {
            "prompt": "Write a short poem about the sea and the moon.\n",
            "chosen": "The sea is deep and the moon is bright above the waves.",
            "rejected": "Cats sleep most of the day.",
        },
        {"prompt": "Water boils at ", "chosen": "one hundred degrees Celsius.", "rejected": "ten degrees."},
        {
            "prompt": "Translate the sentence into French: good morning, my friend.\nFrench:",
            "chosen": " Bonjour, mon ami.",
            "rejected": " Merci beaucoup, merci beaucoup, merci beaucoup, merci beaucoup.",
        },
        {"prompt": "Numbers: 0 1 2 3 4 5 6 7 8 9 10 4", "chosen": "2", "rejected": "2024 100"},
        {
            "prompt": (
                "You are a helpful assistant. Answer in one sentence. The weather today is sunny with a light "
                "breeze from the west. Cats sleep most of the day and hunt at night. Summarize the story in a "
                "few words, please."
            ),
            "chosen": " Sunny, breezy, sleepy cats.",
            "rejected": " I do not know.",
        },
        {"prompt": "The quick brown fox jum", "chosen": "ps over the lazy dog.", "rejected": "ped."},
        {
            "prompt": "Summarize: a language model assigns a probability to every sequence of tokens.  ",
            "chosen": "It scores token sequences.",
            "rejected": "The quick brown fox jumps over the lazy dog and then the lazy dog jumps over the fox.",
        },
    ]


def conversational_rows() -> list[dict]:
    """~8 conversational rows (message lists); one prompt has a system message."""

    def row(user, chosen, rejected, system=None):
        prompt = [{"role": "user", "content": user}]
        if system is not None:
            prompt.insert(0, {"role": "system", "content": system})
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    return [
        row("What is two plus two?", "Four.", "Five."),
        row("What is the capital of France?", "Paris is the capital of France.", "Berlin."),
        row(
            "What is the capital of Germany?",
            "Berlin.",
            "I do not know the answer to that question.",
            system="You are a helpful assistant. Answer in one sentence.",
        ),
        row("Hi", "Hello! How can I help?", "Bye."),
        row(
            "Write a short poem about the sea and the moon.",
            "The sea is deep and the moon is bright above the waves.",
            "No.",
        ),
        row("Translate into French: good morning, my friend.", "Bonjour, mon ami.", "Merci beaucoup."),
        row("At what temperature does water boil?", "One hundred degrees Celsius at sea level.", "Ten."),
        row(
            "Summarize: once upon a time there was a small robot who loved to read books.",
            "A robot loved books.",
            "The weather today is sunny with a light breeze from the west.",
        ),
    ]


def small_file_ids(vocab: int) -> list[dict]:
    """4 encoded pairs (prompt_ids, chosen_ids, rejected_ids) whose 8 sequences have 8 lengths, 12, 24,
    ..., 96 tokens (chosen of pair i: 24i + 12, rejected: 24i + 24), so 8 precompute widths: a small
    file, where no two sequences share a batch (the bench's 4 step pairs: 6 widths, 5 of one sequence)."""
    import numpy as np

    rng = np.random.default_rng(1)
    shapes = [(6, 6, 18), (10, 26, 38), (20, 40, 52), (30, 54, 66)]  # prompt, chosen, rejected tokens
    return [{key: rng.integers(5, vocab, n).tolist() for key, n in zip(("prompt_ids", "chosen_ids", "rejected_ids"), shape)}
            for shape in shapes]


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    texts = list(_CORPUS)
    for r in standard_rows():
        texts.append(r["prompt"] + r["chosen"])
        texts.append(r["prompt"] + r["rejected"])
    for r in conversational_rows():
        for m in r["prompt"] + r["chosen"] + r["rejected"]:
            texts.append(m["content"])
    return texts


def build_tokenizer(directory, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer on a fixed corpus and save it as a `PreTrainedTokenizerFast`.

    Llama-like: a TemplateProcessing post-processor prepends bos; eos is not appended. Returns the tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]  # ids 0..6, in this order

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


# ------------------------------------------------------------------------------------------------- model


def build_llama(
    directory,
    tokenizer_dir=None,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    rope_theta: float = 10000.0,
):
    """A random tiny float32 `LlamaForCausalLM` saved as safetensors, with the tokenizer in the same directory.

    If `tokenizer_dir` is None a tokenizer is built into `directory`. Returns the torch model (eval mode).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = build_tokenizer(directory)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        tokenizer.save_pretrained(str(directory))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    # The default init (std 0.02) gives almost uniform next-token distributions; widen it so that log-probs depend
    # clearly on the tokens and a wrong token/position shows up as a large difference.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def invoke_cli(*args, catch_exceptions: bool = False):
    """`mlx-dpo ARGS` in-process (arguments str()-ed); click's Result. By default an unexpected exception
    propagates with its traceback instead of being folded into the Result."""
    from click.testing import CliRunner

    from mlx_dpo.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def run_cli(*args, ok: bool = True):
    """`mlx-dpo ARGS` in-process (arguments str()-ed); with `ok`, assert it exited 0. Returns click's Result."""
    result = invoke_cli(*args, catch_exceptions=True)
    assert not ok or result.exit_code == 0, result.output
    return result


def ring_launch(n: int = 2) -> list[str]:
    """`mlx.launch --backend ring -n N --starting-port P` with P..P+N-1 free now. mlx.launch's default port
    (32323) is fixed, so two suites launching at once on one machine connect to each other's ranks and hang."""
    import socket
    import sys

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + n > 65535:
            continue
        try:
            held = []
            for p in range(port, port + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", str(n),
                "--starting-port", str(port)]
    raise RuntimeError("no free ports for mlx.launch")
