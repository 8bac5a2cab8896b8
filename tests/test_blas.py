"""OpenBLAS is loaded before mlx on Linux x86 (speed itself is measured in bench/, not here)."""

import platform
import subprocess
import sys

import pytest

linux_x86 = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64", reason="Linux x86_64 only")


def _status(env_extra=None, code="import mlx_dpo; print(mlx_dpo.BLAS_STATUS)"):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


@linux_x86
def test_openblas_is_loaded_globally_and_mlx_uses_it():
    code = ("import mlx_dpo, mlx.core as mx; print(mlx_dpo.BLAS_STATUS);"
            "a = mx.ones((64, 64)); print(float((a @ a)[0, 0]));"
            "print(any('openblas' in line for line in open('/proc/self/maps')))")
    status, product, mapped = _status(code=code).splitlines()
    assert status.startswith("loaded OpenBLAS"), status
    assert product == "64.0" and mapped == "True"


@linux_x86
@pytest.mark.parametrize("env, asked, runs", [({"OPENBLAS_NUM_THREADS": "1"}, 2, 1), ({}, 1, 1)], ids=["user-set-1", "unset"])
def test_a_users_openblas_num_threads_caps_what_precompute_asks_for(env, asked, runs):
    """precompute's two streams ask OpenBLAS for cores // 2 threads each (pipeline/reference.py); a
    user's OPENBLAS_NUM_THREADS=1 (the fix on a busy machine) must win over that, and 1 must take."""
    import os

    code = ("import ctypes, mlx_dpo\nfrom mlx_dpo._blas import blas_threads, status\n"
            "openblas = ctypes.CDLL(status.split(' from ', 1)[1])\n"
            f"with blas_threads({asked}):\n    print(openblas.openblas_get_num_threads())\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "GOTO_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}, check=True)
    assert out.stdout.strip() == str(runs), out.stderr


def test_environment_variable_turns_it_off():
    assert _status({"MLX_DPO_OPENBLAS": "0"}).strip() == "disabled by MLX_DPO_OPENBLAS=0"


def test_schemas_never_import_mlx():
    out = _status(code="import sys, mlx_dpo.schemas, mlx_dpo.cli; print('mlx.core' in sys.modules)")
    assert out.strip() == "False"
