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
    fields: Fields = Fields()  # the columns read, resolved by select_sources

    def rows(self):
        return zip(self.indices, self.dataset)


SHAREGPT_PROMPT = "conversations"  # LLaMA-Factory's column of {from, value} messages


def resolve_fields(cfg: PrecomputeConfig, columns: list[str], where: str) -> Fields:
    """Column names for `columns`: a column named by an option must exist; by default the prompt is
    `prompt`, else `conversations`, else implicit (None), and the system column `system` if present."""
    listed = ", ".join(columns)
    for option in ("prompt", "chosen", "rejected", "system"):
        name = getattr(cfg, f"{option}_field")
        if name is None or name in columns:
            continue
        if option in ("chosen", "rejected") and name == option:  # the default name: no option was given
            raise UserError(f"{where}: missing column {name!r} (columns: {listed}; see --{option}-field)")
        raise UserError(f"{where}: --{option}-field {name!r}: no such column (columns: {listed})")
    prompt = cfg.prompt_field or next((c for c in ("prompt", SHAREGPT_PROMPT) if c in columns), None)
    system = cfg.system_field or ("system" if "system" in columns else None)
    return Fields(prompt, cfg.chosen_field, cfg.rejected_field, system)


def select_sources(splits, cfg: PrecomputeConfig) -> tuple[dict[str, Source], str | None]:
    """{'train': Source, 'valid': Source?} and the name of the data's eval split (if it has one). The
    columns read are resolved on the train split; every split must have those an option names."""
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
    fields = resolve_fields(cfg, train.column_names, f"{cfg.data} [train]")
    for name, source in sources.items():
        resolve_fields(cfg, source.dataset.column_names, f"{cfg.data} [{name}]")
        if len(source.dataset) == 0:
            raise UserError(f"{cfg.data} [{name}]: the split has no rows")
        source.fields = fields
    return sources, eval_name


@dataclass
class EncodeNotes:
    """What encoding found in one split, for the summary and the manifest."""

    formats: Counter  # format name -> rows
    prompt_tail_dropped: int = 0  # rows whose template renders the prompt otherwise alone (see encode.py)
    prompt_tail_example: dict | None = None  # {"index", "dropped"} of the first such row

    def to_json(self) -> dict:
        return {"formats": dict(self.formats.most_common()), "prompt_tail_dropped": self.prompt_tail_dropped,
                "prompt_tail_example": self.prompt_tail_example}


def describe_inputs(inputs: dict, split: str, indent: str = "    ") -> list[str]:
    """Summary lines for one split's encode notes (EncodeNotes.to_json): its format, and the rows
    whose prompt tail the chat template drops, with one example."""
    notes = inputs.get(split)
    if not notes:
        return []
    formats = notes["formats"]
    lines = [indent + "format: " + (", ".join(f"{k} ({n:,} rows)" for k, n in formats.items())
                                    if len(formats) > 1 else next(iter(formats), "none"))]
    if notes["prompt_tail_dropped"]:
        example = notes["prompt_tail_example"]
        lines.append(f"{indent}prompt tail dropped: {notes['prompt_tail_dropped']:,} rows (the chat template renders "
                     f"the prompt alone otherwise than inside the conversation), e.g. row {example['index']}: "
                     f"{example['dropped']!r} is in no training sequence")
    return lines


def encode_source(tokenizer, source: Source, cfg: PrecomputeConfig) -> tuple[list[dict | str], EncodeNotes]:
    """Per input row: the encoded row dict, or the reason it was rejected (a string); and the notes."""
    out, notes, run_kwargs = [], EncodeNotes(Counter()), cfg.template_kwargs()
    for index, raw in source.rows():
        try:
            row, kind = normalize(raw, source.fields)
            notes.formats[kind] += 1
            encoded = encode_row(tokenizer, row, run_kwargs)
            check_fits(encoded, cfg.max_length, cfg.truncation_mode)
        except RowRejected as reason:
            out.append(str(reason))
            continue
        out.append({"index": index, "prompt_ids": encoded.prompt_ids, "chosen_ids": encoded.chosen_ids,
                    "rejected_ids": encoded.rejected_ids})
        if encoded.dropped_prompt_tail is not None:
            notes.prompt_tail_dropped += 1
            notes.prompt_tail_example = notes.prompt_tail_example or {"index": index, "dropped": encoded.dropped_prompt_tail}
    return out, notes


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
