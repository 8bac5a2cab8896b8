"""Loading a model and tokenizer through mlx-lm, in its compute dtype (float32 on CPU), and hashing
exactly the files mlx-lm reads to build it."""

import json
import struct
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError
from .schemas.identity import DTYPES, hash_files

# Any one of these lets transformers' AutoTokenizer build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def resolve_model_path(name: str) -> Path:
    """A local directory as is; otherwise a Hugging Face id, downloaded by mlx-lm's own resolver."""
    if Path(name).is_dir():
        return Path(name)
    if Path(name).exists():
        raise UserError(f"{name}: a model must be a directory with config.json and *.safetensors, not a file")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{name}: no such model directory")
    from mlx_lm.utils import _download  # the resolver mlx_lm.load uses, so both see the same files

    try:
        return Path(_download(name))
    except Exception as error:  # hub errors come in many types; all mean "cannot get this model"
        raise UserError(f"{name}: not a local model directory and could not be fetched from the hub ({error})") from error


def checked_model_path(name: str) -> Path:
    path = resolve_model_path(name)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model directory (no config.json)")
    if not weight_files(path):
        raise UserError(f"{path}: no model*.safetensors weights (only safetensors are loaded, never pickle)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The Hugging Face tokenizer mlx-lm would use for this model. Custom tokenizer code in the
    model directory runs only with `trust_remote_code`."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    try:
        wrapper = mlx_lm_load_tokenizer(path, {"trust_remote_code": trust_remote_code})
    except Exception as error:
        raise UserError(f"{path}: could not load the tokenizer ({type(error).__name__}: {error})") from error
    return getattr(wrapper, "_tokenizer", wrapper)


def weight_files(path: Path) -> list[Path]:
    """The weight files mlx_lm.load_model reads: `model*.safetensors` (its glob; an adapters or other
    *.safetensors file beside them is not loaded). With an index file, every file it names must be there."""
    files = sorted(Path(path).glob("model*.safetensors"))
    index = Path(path) / "model.safetensors.index.json"
    if index.is_file() and files:
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{index}: unreadable weight index ({error})") from error
        if missing := sorted(named - {f.name for f in files}):
            raise UserError(f"{path}: {missing[0]} is named in {index.name} but missing")
    return files


def weights_hash(path: Path) -> str:
    """Content hash of what decides the model's outputs as mlx-lm loads it: the weight files, config.json
    (architecture and quantization settings) and hf_quant_config.json when present (ModelOpt
    quantization, which mlx-lm reads from there)."""
    extra = [Path(path) / name for name in ("config.json", "hf_quant_config.json") if (Path(path) / name).is_file()]
    return hash_files(weight_files(path) + extra)


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(path: Path) -> str:
    """The floating dtype most of the checkpoint's tensors are stored in (read from the safetensors
    headers, without loading them); a quantized model's is that of its scales."""
    counts = Counter()
    for file in weight_files(path):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        counts.update(_SAFETENSORS_DTYPES[t["dtype"]] for name, t in header.items()
                      if name != "__metadata__" and t.get("dtype") in _SAFETENSORS_DTYPES)
    return counts.most_common(1)[0][0] if counts else "float32"


def compute_dtype(path: Path, requested: str | None = None) -> str:
    """The dtype the model computes in: `requested`, else float32 on CPU (only float32 matmuls reach
    BLAS on x86, and the cache stores float32) and the checkpoint's dtype on a GPU."""
    if requested is not None:
        if requested not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
        return requested
    return "float32" if mx.default_device() == mx.cpu else checkpoint_dtype(path)


def load_model(path: Path, trust_remote_code: bool = False, dtype: str | None = None) -> nn.Module:
    """The model through mlx-lm (safetensors only; a config's custom `model_file` runs only with
    `trust_remote_code`), its floating parameters cast to compute_dtype(path, dtype)."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    target = getattr(mx, compute_dtype(path, dtype))
    try:
        model, _ = mlx_lm_load_model(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise UserError(f"{path}: could not load the model ({type(error).__name__}: {error})") from error
    model.set_dtype(target)  # floating parameters only: quantized weights stay packed integers
    return model
