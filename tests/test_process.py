"""The `mlx-dpo` command loads no module it does not use: transformers would import torch whenever it
is installed (it is, in the test venv), and loading a tokenizer would then pull in accelerate and sympy
too (~250 MB resident; README: Benchmarks). datasets and pandas are the precompute's, never train's."""

import json
import os
import subprocess
import sys

from mlx_dpo.process import keep_torch_out_of_transformers

# Run the console entry (mlx_dpo.cli.main) as `mlx-dpo` does; at exit, print the modules it imported.
PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(k for k, v in sys.modules.items() if v is not None))))
sys.argv = ["mlx-dpo", *sys.argv[1:]]
runpy.run_module("mlx_dpo", run_name="__main__")
"""
NEVER = {"torch", "accelerate", "sympy", "matplotlib"}


def imported_by(*args) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # set by a test import
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PyTorch was not found" not in result.stderr  # transformers' advice, meaningless here
    return {name.split(".")[0] for name in json.loads(result.stdout.rsplit("MODULES ", 1)[1])}


def test_train_imports_neither_torch_nor_the_precompute_modules(standard_cache, tiny_model_dir, tmp_path):
    # The cache was precomputed in this process, with torch importable: the tokenizer fingerprint it
    # records must still match the one train computes with torch hidden, or train would refuse it.
    top = imported_by("train", "--cache", standard_cache, "--model", tiny_model_dir, "--output", tmp_path / "run",
                      "--iters", 2, "--batch-size", 2)
    assert {"transformers", "tokenizers", "mlx_lm"} <= top  # the tokenizer and model were loaded
    assert sorted(top & (NEVER | {"datasets", "pandas"})) == []


def test_precompute_imports_no_torch(tiny_model_dir, standard_data, tmp_path):
    top = imported_by("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "cache",
                      "--max-length", 22)
    assert {"transformers", "datasets"} <= top
    assert sorted(top & NEVER) == []


def test_left_alone_once_transformers_is_imported_and_for_other_commands():
    import transformers  # noqa: F401  (in this process the choice is already made)

    assert not keep_torch_out_of_transformers(["train", "--cache", "c"])
    assert "torch" not in sys.modules or sys.modules["torch"] is not None
