"""Loading a model and tokenizer through mlx-lm, in float32 on CPU, and hashing its weights."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError
from .schemas.identity import hash_files

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
    if not list(path.glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (only safetensors are loaded, never pickle)")
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


def load_model(path: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model through mlx-lm (safetensors only; a config's custom `model_file` runs only with
    `trust_remote_code`). CPU models are cast to float32: on x86 only float32 matmuls reach BLAS,
    and float32 is what the cached log-probs are stored in."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    try:
        model, _ = mlx_lm_load_model(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise UserError(f"{path}: could not load the model ({type(error).__name__}: {error})") from error
    if mx.default_device() == mx.cpu and not _is_quantized(model):
        model.set_dtype(mx.float32)
    return model


def _is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def weights_hash(path: Path) -> str:
    """Content hash of the weights and the config that shapes them."""
    return hash_files(sorted(path.glob("*.safetensors")) + [path / "config.json"])
