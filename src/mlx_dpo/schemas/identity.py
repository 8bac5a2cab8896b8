"""Cache identity: a hash over everything that changes the cached values.

Fields (all strings or plain JSON): schema_version, reference_weights (content hash),
tokenizer (behaviour fingerprint incl. chat template), data (content hash of the input rows),
options (max_length, truncation_mode, splits, fields).
"""

import hashlib
import json
from pathlib import Path


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


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides token ids: vocabulary, special tokens, chat template, and how a probe
    string encodes (which catches normalizer, pre-tokenizer and BOS-adding differences)."""
    probe = "Hello, world!  The 3 quick brown foxes; naïve café.\nNew line"
    state = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")],
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": list(tokenizer(probe)["input_ids"]),
    }
    return hashlib.sha256(_canonical(state)).hexdigest()


def short_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:12] + "…" if len(text) > 16 else text


def describe_difference(cached: dict, current: dict, current_name: str = "this run") -> str:
    """One line naming every identity field that differs, e.g. 'tokenizer differs: cache a1b2…, model c3d4…'."""
    parts = []
    for key in sorted(set(cached) | set(current)):
        old, new = cached.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                if old.get(sub) != new.get(sub):
                    parts.append(f"{key}.{sub} differs: cache {short_value(old.get(sub))}, {current_name} {short_value(new.get(sub))}")
        elif old != new:
            parts.append(f"{key} differs: cache {short_value(old)}, {current_name} {short_value(new)}")
    return "; ".join(parts)
