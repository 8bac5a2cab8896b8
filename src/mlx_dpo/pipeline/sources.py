"""Which input rows go into which cache split, and their encoding (formats -> token ids)."""

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..schemas.sequence import rejected_id_lists
from .config import PrecomputeConfig
from .encode import RowRejected, check_fits, encode_row
from .formats import Fields, normalize
from .load import find_eval_split, pick_split

EVAL_CACHE_SPLIT = "valid"
# Seed of the --valid-fraction hold-out; part of the contract (same data -> same split).
VALID_FRACTION_SEED = 0


@dataclass
class Source:
    dataset: object  # datasets.Dataset
    indices: list[int]  # each row's position in the input split (the cache's `index` column)

    def rows(self):
        return zip(self.indices, self.dataset)


def fields_of(cfg: PrecomputeConfig) -> Fields:
    return Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field, cfg.system_field)


def select_sources(splits, cfg: PrecomputeConfig) -> tuple[dict[str, Source], str | None]:
    """{'train': Source, 'valid': Source?} and the name of the data's eval split (if it has one)."""
    train = pick_split(splits, cfg.split, cfg.data)
    sources = {"train": Source(train, list(range(len(train))))}
    eval_name = find_eval_split(splits, cfg.split)
    if eval_name is not None:
        sources[EVAL_CACHE_SPLIT] = Source(splits[eval_name], list(range(len(splits[eval_name]))))
    elif cfg.valid_fraction > 0:
        order = np.random.default_rng(VALID_FRACTION_SEED).permutation(len(train))
        n_valid = max(1, round(cfg.valid_fraction * len(train)))
        valid, kept = sorted(order[:n_valid].tolist()), sorted(order[n_valid:].tolist())
        sources = {"train": Source(train.select(kept), kept), EVAL_CACHE_SPLIT: Source(train.select(valid), valid)}
    fields = fields_of(cfg)
    for name, source in sources.items():
        missing = fields.missing(source.dataset.column_names)
        if missing:
            raise UserError(
                f"{cfg.data} [{name}]: missing column {', '.join(map(repr, missing))} "
                f"(columns: {', '.join(source.dataset.column_names)}; see --chosen-field/--rejected-field)"
            )
        if len(source.dataset) == 0:
            raise UserError(f"{cfg.data} [{name}]: the split has no rows")
    return sources, eval_name


def encode_source(tokenizer, source: Source, cfg: PrecomputeConfig) -> list[dict | str]:
    """Per input row: the encoded row dict, or the reason it was rejected (a string)."""
    fields, out = fields_of(cfg), []
    for index, raw in source.rows():
        try:
            encoded = encode_row(tokenizer, normalize(raw, fields))
            check_fits(encoded, cfg.max_length, cfg.truncation_mode)
            out.append({"index": index, **vars(encoded)})
        except RowRejected as reason:
            out.append(str(reason))
    return out


def settle_rejected_count(encoded: dict[str, list[dict | str]]) -> int:
    """K, the rejected answers per prompt: 1 unless rows hold lists, then the most common list
    length. Rows with another count are rejected (a batch needs one K); returns K."""
    counts = Counter(
        len(r["rejected_ids"]) if isinstance(r["rejected_ids"][0], list) else 0
        for rows in encoded.values() for r in rows if isinstance(r, dict)
    )
    if not counts or set(counts) == {0}:
        return 1
    k = max((c for c in counts if c), key=lambda c: (counts[c], c))
    for rows in encoded.values():
        for i, r in enumerate(rows):
            if isinstance(r, dict):
                answers = rejected_id_lists(r["rejected_ids"])
                if len(answers) != k:
                    rows[i] = f"has {len(answers)} rejected answer(s) where this cache has {k} per prompt"
                else:
                    r["rejected_ids"] = answers if k > 1 else answers[0]  # one answer: the flat TRL layout
    return k
