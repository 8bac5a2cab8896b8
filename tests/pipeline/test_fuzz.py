"""Property tests: random, malformed rows thrown at the loader and the encoder. The loader either
refuses a file with a one-line UserError or hands back exactly the values written; the encoder
either encodes a row or rejects it with a reason, never crashes. Rows in = encoded + rejected."""

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny_models
from mlx_dpo.errors import UserError
from mlx_dpo.pipeline.encode import RowRejected, check_fits, encode_row
from mlx_dpo.pipeline.load import load_splits

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", tiny_models.EOS, " four." + tiny_models.EOS, "<|user|>", "Paris", " Paris"]),
)
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", ""]),
    "content": st.one_of(TEXT, st.none(), st.integers(-5, 5)),
})
# Floats with short exact decimals: Arrow's JSON reader can round a 17-digit float by one ulp
# (1.0000000000000002e16 reads back as 1e16), a quirk of the parser, not something we could fix or hide.
FLOAT = st.integers(-10**6, 10**6).map(lambda i: i / 64)
VALUE = st.one_of(
    TEXT, TEXT, st.none(), st.integers(), FLOAT, st.booleans(),
    st.lists(MESSAGE, max_size=3), st.lists(TEXT, max_size=3), st.dictionaries(st.text(max_size=3), TEXT, max_size=2),
)
ROW = st.fixed_dictionaries({"prompt": VALUE, "chosen": VALUE, "rejected": VALUE})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from mlx_dpo.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def encode_or_reason(tokenizer, row, max_length=24):
    try:
        encoded = encode_row(tokenizer, row)
        check_fits(encoded, max_length, "keep_start")
    except RowRejected as reason:
        assert str(reason), "a rejection must say why"
        return str(reason)
    return encoded


def flat_ids(value):
    return [x for item in value for x in (flat_ids(item) if isinstance(item, list) else [item])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=ROW)
def test_the_encoder_encodes_or_rejects_every_row(tokenizer, row):
    result = encode_or_reason(tokenizer, row)
    if isinstance(result, str):
        return
    vocab = len(tokenizer)
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        ids = getattr(result, name)
        assert all(isinstance(i, int) and 0 <= i < vocab for i in flat_ids(ids)), name
    assert result.chosen_ids and flat_ids(result.rejected_ids)


_files = itertools.count()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(ROW, ROW.map(lambda r: {**r, "prompt": "Q:", "chosen": " yes", "rejected": " no"})),
                     max_size=6))
def test_the_loader_returns_what_was_written_or_refuses(tokenizer, tmp_path, rows):
    path = tmp_path / f"rows-{next(_files)}.jsonl"  # a new name each time: datasets caches by path
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        loaded = list(load_splits(str(path))["train"])
    except UserError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
        return
    assert loaded == rows  # nothing re-parsed, retyped or dropped


# Text or null in every field: the loader reads these, so each row is cached or rejected by its content.
GOOD_ROW = {"prompt": "Question: what is two plus two?\nAnswer:", "chosen": " four.", "rejected": " five."}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(st.just(GOOD_ROW), st.fixed_dictionaries({k: st.one_of(TEXT, st.none()) for k in GOOD_ROW})),
                     min_size=1, max_size=8))
def test_precompute_accounts_for_every_row(tiny_model_dir, tmp_path, rows):
    from mlx_dpo.pipeline.config import PrecomputeConfig
    from mlx_dpo.pipeline.precompute import precompute
    from mlx_dpo.schemas.verify import check_cache

    n = next(_files)
    data, out = tmp_path / f"rows-{n}.jsonl", tmp_path / f"cache-{n}"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        manifest = precompute(PrecomputeConfig(model=str(tiny_model_dir), data=str(data), out=str(out),
                                               max_length=24, rows_per_shard=3), log=lambda *_: None)
    except UserError as error:
        assert "\n" not in str(error) and not (out / "manifest.json").exists()
        return
    train = manifest.splits["train"]
    assert train.rows_in == len(rows) == train.rows_cached + train.rows_rejected
    assert check_cache(out, manifest, full=True) == []  # shards + rejects.jsonl cover every row once
