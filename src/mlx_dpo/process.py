"""Process-wide setup of the `mlx-dpo` command (not of the library inside someone else's program).

mlx-dpo uses transformers only for tokenizers, but transformers imports torch at import time whenever
torch is installed (`configuration_utils` -> `modeling_rope_utils`), and loading a tokenizer then pulls
in accelerate, sympy, botocore and some 870 more modules: measured on bench-125m, 3.04 GB max RSS of a
cached train step against 2.78 GB with torch kept out (README: Benchmarks). Nothing mlx-dpo runs needs torch.
"""

from __future__ import annotations

import os
import sys

ENV_SWITCH = "MLX_DPO_HIDE_TORCH"
TOKENIZER_COMMANDS = {"train", "precompute"}
ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"


def keep_torch_out_of_transformers(argv: list[str]) -> bool:
    """Make transformers decide, once for the process, that torch is not installed (its
    `is_torch_available` is cached), so it takes its torch-free paths; token ids are the same (a cache
    precomputed with torch importable trains here: tests/test_process.py). torch stays importable for
    anyone else. Returns whether it did: only for the commands that load a tokenizer, before
    transformers or torch is imported, without --trust-remote-code (a model's own tokenizer code may
    use torch), and unless MLX_DPO_HIDE_TORCH=0."""
    if not (TOKENIZER_COMMANDS & set(argv)) or "--trust-remote-code" in argv or os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if {"torch", "transformers"} & sys.modules.keys():
        return False
    sys.modules["torch"] = None  # importlib's way to stop an import: find_spec("torch") is None
    quiet = os.environ.get(ADVICE)
    os.environ[ADVICE] = "1"  # not its "PyTorch was not found. Models won't be available ..."
    try:
        from transformers.utils.import_utils import is_torch_available

        is_torch_available()  # False, and cached
    finally:
        del sys.modules["torch"]  # datasets takes `"torch" in sys.modules` to mean torch was imported
        if quiet is None:
            del os.environ[ADVICE]
        else:
            os.environ[ADVICE] = quiet
    return True
