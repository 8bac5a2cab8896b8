"""Loading a model and tokenizer through mlx-lm, in its compute dtype (float32 on CPU), and hashing
exactly the files mlx-lm reads to build it."""

import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .adapters import WEIGHTS, read_adapter_config
from .errors import UserError
from .schemas.identity import DTYPES, hash_files, identity_hash

# Any one of these lets transformers' AutoTokenizer build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def resolve_model_path(name: str) -> Path:
    """A local directory as is (`~` expanded: config files get no shell); otherwise a Hugging Face id,
    downloaded by mlx-lm's own resolver."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
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


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data) of a safetensors file. UserError names
    the file when it is not one."""
    try:
        with open(file, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > file.stat().st_size - 8:
                raise ValueError(f"header of {size} bytes is longer than the file")
            header = json.loads(handle.read(size))
        tensors = {name: t for name, t in header.items() if name != "__metadata__"}
        for t in tensors.values():
            begin, end = t["data_offsets"]
            if not (isinstance(t["dtype"], str) and isinstance(t["shape"], list) and 0 <= begin <= end):
                raise ValueError("bad tensor entry")
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{file}: not a readable safetensors file ({error})") from error
    return tensors, 8 + size


def tensors_hash(files: list[Path], chunk_bytes: int = 1 << 22) -> str:
    """sha256 over every tensor's name, dtype, shape and data bytes, in name order: the same tensors
    saved again (another tensor order, metadata or file split) hash the same. Reads one chunk at a
    time, so a multi-GB checkpoint is never in memory."""
    entries = sorted((name, file.name, t, offset) for file in files
                     for tensors, offset in [_safetensors_header(file)] for name, t in tensors.items())
    handles = {file.name: open(file, "rb") for file in files}
    digest = hashlib.sha256()
    try:
        for name, file_name, t, offset in entries:
            begin, end = t["data_offsets"]
            digest.update(json.dumps([name, t["dtype"], t["shape"], end - begin]).encode() + b"\0")
            handle = handles[file_name]
            handle.seek(offset + begin)
            left = end - begin
            while left > 0:
                block = handle.read(min(chunk_bytes, left))
                if not block:
                    raise UserError(f"{file_name}: tensor {name} is cut short (the file is truncated)")
                digest.update(block)
                left -= len(block)
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()


def _json_or_bytes(path: Path):
    """A JSON file's parsed content (its formatting does not count), else the sha256 of its bytes."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return hash_files([path])


def weights_hash(path: Path) -> str:
    """Content hash of what decides the model's outputs as mlx_lm.load_model reads it: the tensors
    of `model*.safetensors` (tensors_hash), config.json (architecture, quantization settings), the
    Python file its `model_file` names (run under --trust-remote-code), and hf_quant_config.json
    only where mlx-lm reads it: when config.json (and its text_config) has no quantization_config."""
    path = Path(path)
    config = _json_or_bytes(path / "config.json")
    parts = {"tensors": tensors_hash(weight_files(path)), "config": config}
    if isinstance(config, dict):
        if (model_file := config.get("model_file")) is not None:
            code = path / str(model_file)
            parts["model_file"] = hash_files([code]) if code.is_file() else None
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        quant = path / "hf_quant_config.json"
        if "quantization_config" not in config and "quantization_config" not in text_config and quant.is_file():
            parts["hf_quant_config"] = _json_or_bytes(quant)
    return identity_hash(parts)


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(path: Path) -> str:
    """The floating dtype most of the checkpoint's tensors are stored in (read from the safetensors
    headers, without loading them); a quantized model's is that of its scales."""
    counts = Counter()
    for file in weight_files(path):
        tensors, _ = _safetensors_header(file)
        counts.update(_SAFETENSORS_DTYPES[t["dtype"]] for t in tensors.values() if t["dtype"] in _SAFETENSORS_DTYPES)
    return counts.most_common(1)[0][0] if counts else "float32"


def compute_dtype(path: Path, requested: str | None = None) -> str:
    """The dtype the model computes in: `requested`, else float32 on CPU (only float32 matmuls reach
    BLAS on x86, and the cache stores float32) and the checkpoint's dtype on a GPU."""
    if requested is not None:
        if requested not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {requested!r}")
        return requested
    return "float32" if mx.default_device() == mx.cpu else checkpoint_dtype(path)


def model_config_overrides(path: Path) -> dict:
    """config.json values mlx-lm would misread. transformers >= 5 keeps RoPE's base only inside
    `rope_parameters`; mlx-lm's Llama-family args read the top-level `rope_theta` (`rope_scaling`)
    and would silently use base 10000 (SmolLM2's is 100000: log-probs off by nats)."""
    config = json.loads((path / "config.json").read_text())
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}
    overrides = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        overrides["rope_scaling"] = rope
    return overrides


def quantization(path: Path) -> dict | None:
    """The mlx-lm quantization of a checkpoint ({"bits": 4, "group_size": 64, ...}), or None."""
    config = json.loads((path / "config.json").read_text())
    found = config.get("quantization") or config.get("quantization_config")
    return {k: v for k, v in found.items() if not isinstance(v, dict)} if isinstance(found, dict) else None


def load_model(path: Path, trust_remote_code: bool = False, dtype: str | None = None, *,
               adapter_path: str | None = None, dequantize: bool = False) -> nn.Module:
    """The model through mlx-lm (safetensors only; a config's custom `model_file` runs only with
    `trust_remote_code`), its floating parameters cast to compute_dtype(path, dtype). A quantized
    model stays quantized (QLoRA) unless `dequantize`: then its layers become layers of the very
    weight values the quantized kernels use, computed from scales already widened to the compute
    dtype (float32 on CPU: no product is rounded to float16). `adapter_path`: mlx-lm adapters
    applied on top (unfused, as the policy trains them)."""
    from mlx_lm.utils import dequantize_model
    from mlx_lm.utils import load_model as mlx_lm_load_model

    target = getattr(mx, compute_dtype(path, dtype))
    try:
        model, _ = mlx_lm_load_model(path, trust_remote_code=trust_remote_code,
                                     model_config=model_config_overrides(path))
    except Exception as error:
        raise UserError(f"{path}: could not load the model ({type(error).__name__}: {error})") from error
    model.set_dtype(target)  # floating parameters only: quantized weights stay packed integers
    if dequantize:
        dequantize_model(model)
    if adapter_path is not None:
        apply_adapters(model, adapter_path)
        model.set_dtype(target)  # adapters saved in another dtype (e.g. bfloat16 from a GPU)
    return model


def apply_adapters(model: nn.Module, adapter_path: str) -> None:
    """Freeze `model` and put mlx-lm's adapters from `adapter_path` on it (LoRA/DoRA layers, or the
    weights of a full fine-tune); the LoRA/DoRA parameters are left trainable."""
    from mlx_lm.tuner.utils import load_adapters

    read_adapter_config(adapter_path)  # its fields and types, named in one line
    model.freeze()
    try:
        load_adapters(model, adapter_path)
    except Exception as error:  # shapes of another model, missing tensors, unreadable file
        misfits = _misfits(model, adapter_path)
        if misfits:  # mlx-lm's message has a line per tensor
            raise UserError(f"--adapter-path {adapter_path}: {len(misfits)} adapter tensor(s) do not fit this model "
                            f"(first: {misfits[0]})") from error
        raise UserError(f"--adapter-path {adapter_path}: cannot apply to this model ({type(error).__name__}: {error})") from error


def _misfits(model: nn.Module, adapter_path: str) -> list[str]:
    """The adapter tensors that have no place of their shape in `model` (with its LoRA/DoRA layers
    added, as load_adapters leaves it), one phrase each; [] if the file cannot be read."""
    from mlx.utils import tree_flatten

    try:
        weights = mx.load(str(Path(adapter_path) / WEIGHTS))
    except Exception:
        return []
    params = dict(tree_flatten(model.parameters()))
    full = read_adapter_config(adapter_path).get("fine_tune_type", "lora") == "full"
    misfits = []
    for name, value in sorted(weights.items()):
        place = params.get(name) if full or name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") else None
        if place is None:
            misfits.append(f"{name}: not an adapter parameter of this model")
        elif place.shape != value.shape:
            misfits.append(f"{name}: shape {tuple(value.shape)}, the model's {tuple(place.shape)}")
    return misfits


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding) for _, m in model.named_modules())
