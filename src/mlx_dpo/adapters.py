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
    """adapter_config.json of an adapter directory, its fields checked as mlx-lm reads them; a
    one-line UserError naming the file (and field) when it is unusable."""
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"--adapter-path {path}: no such directory")
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise UserError(f"--adapter-path {path}: no {name} (an mlx-lm adapter directory has {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{directory / CONFIG}: unreadable adapter config ({type(error).__name__}: {error})") from error
    if problem := config_problem(config):
        raise UserError(f"{directory / CONFIG}: {problem}")
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def config_problem(config) -> str | None:
    """What makes an adapter config unusable, naming the field ("lora_parameters.rank is 'four', not
    a positive integer"), or None. mlx-lm's load_adapters reads fine_tune_type (default lora) and, for
    LoRA/DoRA, num_layers and lora_parameters rank, scale, dropout and the optional keys."""
    if not isinstance(config, dict):
        return f"is {type(config).__name__}, not a JSON object"
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        return f"fine_tune_type {kind!r} is not lora, dora or full"
    if kind == "full":
        return None
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        return "lora_parameters is missing" if params is None else f"lora_parameters is {params!r}, not an object"
    checks = [  # (name, value, right, what it must be)
        ("num_layers", config.get("num_layers"), lambda v: _is_int(v) and (v == -1 or v > 0), "a positive integer or -1"),
        ("lora_parameters.rank", params.get("rank"), lambda v: _is_int(v) and v > 0, "a positive integer"),
        ("lora_parameters.scale", params.get("scale"), _is_number, "a number"),
        ("lora_parameters.dropout", params.get("dropout"), lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ]
    for name, value, right, what in checks:
        if value is None:
            return f"{name} is missing (mlx-lm needs it for {kind} adapters)"
        if not right(value):
            return f"{name} is {value!r}, not {what}"
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return f"lora_parameters.keys is {keys!r}, not a list of layer names"
    return None


def adapter_options(config: dict) -> dict:
    """The TrainConfig options a (checked) adapter config fixes, e.g. {"lora_rank": 8, ...}
    (fine_tune_type lora where absent, as mlx-lm)."""
    options = {}
    for name, keys in OPTIONS.items():
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            options[name] = value
    options.setdefault("fine_tune_type", "lora")
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
