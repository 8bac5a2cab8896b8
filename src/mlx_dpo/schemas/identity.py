"""Cache identity: a hash over everything that changes the cached values, and nothing else.

The fields are a dict of named values (IDENTITY_FIELDS, in the manifest as `identity_fields`); a
field is a string or plain JSON, or a dict of named sub-values so differences are named one by one.
To add an input that changes the values, add a named field (or sub-field of "options") where the
pipeline builds them (pipeline/identity.py) and list it here.
"""

import hashlib
import json
from pathlib import Path

# schema_version: the cache layout; reference_weights: content hash of what mlx-lm loads (weights,
# config, quantization); dtype: the reference's compute precision; tokenizer: its behaviour incl. the
# chat template; tokenization_rules: TOKENIZATION_RULES; data: per split, the rows used; options:
# max_length, truncation_mode, splits, valid_fraction, chat_template_kwargs. Present only when used
# (so other caches keep their identity): options.chat_template_kwargs, reference_adapters
# (--adapter-path's fingerprint) and reference_dequantized (the quantization a CPU reference was
# dequantized from).
IDENTITY_FIELDS = ("schema_version", "reference_weights", "dtype", "tokenizer", "tokenization_rules", "data", "options")
# Compute precisions of the reference forward (mlx dtype names).
DTYPES = ("float32", "bfloat16", "float16")
# Version of how mlx-dpo turns a row into token ids (pipeline/formats.py, encode.py): bump it when
# those rules change, so caches built under the old rules are not reused.
TOKENIZATION_RULES = 2  # 2: TRL's extract_prompt split, ShareGPT, tools and template options (#12)
# The rules for data with K rejected answers: 3, a row whose (chosen, rejected_k) pairs leave the prompt
# at different tokens is rejected (before, it was cached, its comparisons not its split pairs). Data of
# single answers keeps TOKENIZATION_RULES, so its caches keep their identity.
SEVERAL_REJECTED_RULES = 3


class CacheMismatch(Exception):
    """The cache was made with a different tokenizer, options or schema than this run uses."""


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def identity_hash(fields: dict) -> str:
    return hashlib.sha256(_canonical(fields)).hexdigest()


def hash_files(paths: list[Path], chunk_bytes: int = 1 << 22) -> str:
    """sha256 over the names and bytes of `paths`, in name order."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


_PROBE = "Hello, world!  The 3 quick brown foxes; naïve café.\nNew line"
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _backend_state(tokenizer):
    """What decides the token ids beyond the Python wrapper: a fast tokenizer's whole serialization
    (model incl. BPE merges, normalizer, pre-tokenizer, post-processor, decoder, added tokens with
    their lstrip/rstrip/normalized flags), parsed so its JSON formatting does not count; else (a
    SentencePiece or other file-based tokenizer) the sha256 of its vocabulary/model files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return json.loads(backend.to_str())
    files = {}
    for key in sorted(getattr(tokenizer, "vocab_files_names", {}) or {}):
        name = getattr(tokenizer, key, None) or (getattr(tokenizer, "init_kwargs", {}) or {}).get(key)
        if isinstance(name, (str, Path)) and Path(name).is_file():
            files[key] = hash_files([Path(name)])
    return files or {"vocab": sorted(tokenizer.get_vocab().items())}


# Packages whose tokenizer code is pinned by their installed version, not hashed per model.
_LIBRARY_PACKAGES = ("transformers", "tokenizers", "builtins")


def _custom_code(tokenizer) -> dict:
    """{class name: sha256 of its source file and the files it imports relatively} for each class of
    the tokenizer not from transformers/tokenizers: a model's own tokenization_*.py (auto_map, loaded
    under --trust-remote-code), whose Python decides the ids. By file name, not path, so a moved model
    keeps its fingerprint. {} for library tokenizers. A class without a source file counts by name."""
    import inspect

    from transformers.dynamic_module_utils import get_relative_import_files

    code = {}
    for cls in type(tokenizer).__mro__:
        if cls.__module__.split(".")[0] in _LIBRARY_PACKAGES:
            continue
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:  # defined outside any file
            source = None
        if source is None or not Path(source).is_file():
            code[cls.__qualname__] = None
            continue
        files = [Path(source)] + [Path(f) for f in get_relative_import_files(source)]
        code[f"{Path(source).stem}.{cls.__qualname__}"] = hash_files(files)
    return code


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids and rendered conversations: the backend (_backend_state),
    the full vocabulary with added tokens, the special tokens, the chat template text(s), and how a
    probe string encodes (the wrapper's own BOS/EOS adding), and the source of a custom tokenizer class
    (_custom_code). Nothing clock-dependent is rendered: a
    template calling strftime_now counts by its text, not by today's output."""
    state = {
        "backend": _backend_state(tokenizer),
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {name: str(getattr(tokenizer, name, None)) for name in _SPECIAL},
        "extra_special": sorted(map(str, getattr(tokenizer, "all_special_tokens", []) or [])),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": list(tokenizer(_PROBE)["input_ids"]),
    }
    # tokenizer_config's split_special_tokens: special-token text (EOS, template role tokens) encodes as
    # plain text. Set on the wrapper, not in the backend, and the probe has no special token; only when
    # on, so other tokenizers keep their fingerprint.
    if getattr(tokenizer, "split_special_tokens", False):
        state["split_special_tokens"] = True
    # Python tokenizer code shipped with the model: only when present, as above.
    if code := _custom_code(tokenizer):
        state["code"] = code
    return hashlib.sha256(_canonical(state)).hexdigest()


def missing_fields(fields: dict) -> list[str]:
    """The IDENTITY_FIELDS a manifest's identity_fields lack (a cache from before them)."""
    return [name for name in IDENTITY_FIELDS if name not in fields]


def short_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:12] + "…" if len(text) > 16 else text


# Identity fields that say which rows a cache holds, not how a row is scored.
_DATA_FIELDS = ("data",)
_DATA_OPTIONS = ("splits", "valid_fraction")


def reference_fields(fields: dict) -> dict:
    """The identity fields that decide a row's values (the reference identity: weights and adapters,
    dtype, tokenizer and template, tokenization rules, max_length, truncation, schema): all but the
    data and split choices. Caches that agree on them score a row the same way."""
    kept = {k: v for k, v in fields.items() if k not in _DATA_FIELDS}
    if isinstance(kept.get("options"), dict):
        kept["options"] = {k: v for k, v in kept["options"].items() if k not in _DATA_OPTIONS}
    return kept


def describe_difference(cached: dict, current: dict, current_name: str = "this run", cached_name: str = "cache") -> str:
    """One line naming every identity field that differs, e.g. 'tokenizer differs: cache a1b2…, model c3d4…'."""
    parts = []
    for key in sorted(set(cached) | set(current)):
        old, new = cached.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                if old.get(sub) != new.get(sub):
                    parts.append(f"{key}.{sub} differs: {cached_name} {short_value(old.get(sub))}, {current_name} {short_value(new.get(sub))}")
        elif old != new:
            parts.append(f"{key} differs: {cached_name} {short_value(old)}, {current_name} {short_value(new)}")
    return "; ".join(parts)
