"""mlx-lm adapters as a starting point (`--adapter-path`): their options and their fingerprint.

An adapter directory is what `mlx_lm.lora` (or `mlx-dpo train`) writes: adapter_config.json
(fine_tune_type, num_layers, lora_parameters {rank, scale, dropout[, keys]}) and
adapters.safetensors. Imports no mlx, so the configs can use it.
"""

import hashlib
import json
from pathlib import Path

from .errors import UserError

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
# TrainConfig field <- where adapter_config.json keeps it (mlx-lm's names).
OPTIONS = {
    "fine_tune_type": ("fine_tune_type",),
    "num_layers": ("num_layers",),
    "lora_rank": ("lora_parameters", "rank"),
    "lora_scale": ("lora_parameters", "scale"),
    "lora_dropout": ("lora_parameters", "dropout"),
}
DEFAULTS = {"fine_tune_type": "lora", "num_layers": -1, "lora_rank": 8, "lora_scale": 20.0, "lora_dropout": 0.0}


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of an adapter directory; UserError naming the file when it is unusable."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"--adapter-path {path}: no such directory")
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise UserError(f"--adapter-path {path}: no {name} (an mlx-lm adapter directory has {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((directory / CONFIG).read_text())
        options = adapter_options(config)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{directory / CONFIG}: unreadable adapter config ({type(error).__name__}: {error})") from error
    if options["fine_tune_type"] not in ("lora", "dora", "full"):
        raise UserError(f"{directory / CONFIG}: fine_tune_type {options['fine_tune_type']!r} is not lora, dora or full")
    return config


def adapter_options(config: dict) -> dict:
    """The TrainConfig options an adapter config fixes, e.g. {"lora_rank": 8, ...} (mlx-lm's defaults
    where a key is absent: fine_tune_type lora)."""
    options = {}
    for name, keys in OPTIONS.items():
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            options[name] = value
    options.setdefault("fine_tune_type", "lora")
    if options["fine_tune_type"] != "full" and not {"num_layers", "lora_rank", "lora_scale"} <= set(options):
        raise KeyError("num_layers and lora_parameters (rank, scale) are needed for LoRA/DoRA adapters")
    return options


def resolve_options(given: dict, adapter_path: str | None) -> dict:
    """Each LoRA option: as given, else from the adapters, else the default. A given value the
    adapters contradict is refused (training continues on those very adapters)."""
    from_adapters = adapter_options(read_adapter_config(adapter_path)) if adapter_path else {}
    resolved = {}
    for name, default in DEFAULTS.items():
        value, theirs = given.get(name), from_adapters.get(name)
        if value is not None and theirs is not None and value != theirs:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {value}: the adapters in {adapter_path} have {theirs} "
                            f"(training continues on them; drop {flag} or give {theirs})")
        resolved[name] = value if value is not None else theirs if theirs is not None else default
    return resolved


def adapters_fingerprint(path: str | Path) -> str:
    """sha256 of the adapter weights and the options that shape them (not provenance such as paths)."""
    directory = Path(path)
    config = read_adapter_config(directory)
    shape = {**adapter_options(config), "keys": (config.get("lora_parameters") or {}).get("keys")}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode() + b"\0")
    with open(directory / WEIGHTS, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def starting_lora_keys(adapter_path: str | None) -> dict:
    """{"keys": [...]} when the starting adapters sit on other layers than mlx-lm's default choice."""
    if adapter_path is None:
        return {}
    keys = (read_adapter_config(adapter_path).get("lora_parameters") or {}).get("keys")
    return {} if keys is None else {"keys": keys}
