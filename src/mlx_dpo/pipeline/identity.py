"""The identity fields of a cache this run would write: everything that changes the cached values
(see schemas/identity.py for the list), computed before any forward pass so a cache can be reused
without loading the model."""

import dataclasses
import hashlib
import json
from pathlib import Path

from ..models import weights_hash
from ..schemas import SCHEMA_VERSION, tokenizer_fingerprint
from ..schemas.identity import SEVERAL_REJECTED_RULES, TOKENIZATION_RULES
from .config import PrecomputeConfig
from .formats import Fields
from .jsontext import KeyOrders, WrittenJson
from .reference import reference_variant
from .sources import EVAL_CACHE_SPLIT, Source


def data_hash(source: Source, fields: Fields) -> tuple[str, bool]:
    """(sha256 over each row's input position and the values of the columns the run reads, keyed by
    their role (prompt, chosen, rejected, system, ...): other columns, the column names and a role
    whose column the data lacks (or holds null) do not count. Keys are sorted, but an object whose
    key order differs from its column's first one adds that order (a template may render it);
    whether some row holds K rejected answers)."""
    columns = source.dataset.column_names
    roles = {f.name: getattr(fields, f.name) for f in dataclasses.fields(fields)}
    present = {role: column for role, column in roles.items() if column in columns}
    used = source.dataset.select_columns(sorted(set(present.values())))
    digest, orders, several = hashlib.sha256(), KeyOrders(), False
    for index, row in zip(source.indices, used):
        values = {role: _as_read(row[column]) for role, column in present.items() if row[column] is not None}
        record = [index, values]
        if deviations := orders.deviations(values):  # only then, so other rows keep their identity
            record.append(deviations)
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
        several = several or _several(values.get("rejected"))
    return digest.hexdigest(), several


def _several(rejected) -> bool:
    """A written rejected value of K answers (strings or message lists), not one string or message
    (list). Loose on purpose: a false yes only costs a cache its reuse."""
    return isinstance(rejected, list) and bool(rejected) and all(isinstance(a, str | list) for a in rejected)


def _as_read(value):
    """A column value as hashed: the object a JSON file's tools or chat_template_kwargs hold, not
    the text the loader keeps them as (jsontext.WrittenJson), so their identity is the object's."""
    return json.loads(value) if isinstance(value, WrittenJson) else value


def identity_fields(cfg: PrecomputeConfig, sources: dict[str, Source], eval_name: str | None,
                    tokenizer, model_path: Path, dtype: str) -> dict:
    """The named identity fields (schemas.identity.IDENTITY_FIELDS) of this run's cache."""
    hashes = {name: data_hash(source, source.fields) for name, source in sources.items()}
    several = any(flag for _, flag in hashes.values())
    return {
        "schema_version": SCHEMA_VERSION,
        "reference_weights": weights_hash(model_path),
        **reference_variant(model_path, cfg.adapter_path, dtype),
        "dtype": dtype,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization_rules": SEVERAL_REJECTED_RULES if several else TOKENIZATION_RULES,
        "data": {name: digest for name, (digest, _) in hashes.items()},
        "options": {
            "max_length": cfg.max_length,
            "truncation_mode": cfg.truncation_mode,
            "splits": {"train": cfg.split, EVAL_CACHE_SPLIT: eval_name},
            "valid_fraction": cfg.valid_fraction if eval_name is None else 0.0,
            # Only when given, so the identity of caches made without the option does not change.
            **({"chat_template_kwargs": cfg.template_kwargs()} if cfg.template_kwargs() else {}),
        },
    }
