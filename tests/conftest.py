"""Shared fixtures: a tiny random Llama + tokenizer on disk, and small preference data files.

Import order matters: `mlx_dpo` must be imported before anything imports `mlx`, because it loads OpenBLAS
globally for MLX's CPU matmuls (see mlx_dpo/_blas.py). So it is imported here, first; torch and transformers are
only imported inside the builder functions in tiny_models.py, when a fixture needs them.
"""

import os
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
_SRC = _TESTS.parent / "src"

try:
    import mlx_dpo  # noqa: F401  (first: loads OpenBLAS before mlx)
except ImportError:  # not installed and no PYTHONPATH: use the work tree
    sys.path.insert(0, str(_SRC))
    import mlx_dpo  # noqa: F401

# tiny_models lives beside this file; make it importable however pytest was started (rootdir, tests/ as package).
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

# Everything is built locally: never reach for the Hugging Face Hub, and keep progress bars out of test output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402

import tiny_models  # noqa: E402
from real_model import smollm2  # noqa: E402,F401  (session fixture: a real model, see real_model.py)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A directory with a random tiny float32 LlamaForCausalLM (safetensors) and its BPE tokenizer + chat template.

    Loadable both by `transformers.AutoModelForCausalLM.from_pretrained` and by `mlx_lm.load`.
    """
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_models.build_llama(directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def standard_data(tmp_path_factory) -> Path:
    """JSONL of ~12 {prompt, chosen, rejected} string rows."""
    return tiny_models.write_jsonl(tmp_path_factory.mktemp("data") / "standard.jsonl", tiny_models.standard_rows())


@pytest.fixture(scope="session")
def conversational_data(tmp_path_factory) -> Path:
    """JSONL of ~8 conversational rows: prompt = [system?, user] messages, chosen/rejected = [assistant]."""
    return tiny_models.write_jsonl(
        tmp_path_factory.mktemp("data") / "conversational.jsonl", tiny_models.conversational_rows()
    )


@pytest.fixture(scope="session")
def standard_cache(tiny_model_dir, standard_data, tmp_path_factory) -> Path:
    """`precompute` of standard_data with max_length 22 (so some prompts fill it and are rejected), in
    shards of 5 rows. Shared and read-only: copy it before changing it."""
    from click.testing import CliRunner

    from mlx_dpo.cli import cli

    out = tmp_path_factory.mktemp("standard-cache") / "cache"
    args = ["precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out,
            "--max-length", "22", "--rows-per-shard", "5"]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on from now on (files and folders), in order. A power cut cannot
    be simulated here, so durability is checked as: every written file and folder was fsynced."""
    seen, real = [], os.fsync

    def recording(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def atomic_temp_name(path: Path) -> str:
    """The name schemas.atomic writes `path` under before renaming it (what gets fsynced)."""
    return f".{path.stem}.{os.getpid()}.tmp{path.suffix}"
