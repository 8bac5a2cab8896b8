"""The identity hashes exactly what decides the cached values, as the loaders read it (issue 10):
the tokenizer's whole behaviour (not a probe of it, nor today's date), the weights' tensors (not
their file bytes), the model code mlx-lm runs, and hf_quant_config.json only where mlx-lm reads it."""

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tiny_models
from mlx_dpo.errors import UserError

run = tiny_models.invoke_cli


def precompute(model, data, out, *extra):
    result = run("precompute", "--model", model, "--data", data, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def logps(cache):
    table = pq.read_table(sorted((cache / "train").glob("part-*.parquet")))
    return sorted(zip(*(table[c].to_pylist() for c in ("index", "ref_chosen_logps", "ref_rejected_logps"))))


def rows_of(cache):
    table = pq.read_table(sorted((cache / "train").glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["index"])


# ---- the tokenizer

def _drop_unprobed_merge(model, data_text):
    """Remove one BPE merge that a probe string never uses but the data does: vocabulary, special
    tokens and chat template stay the same, the data's token ids change."""
    from tokenizers import Tokenizer

    from mlx_dpo.schemas.identity import _PROBE as probe
    spec = json.loads((model / "tokenizer.json").read_text())
    base = Tokenizer.from_str(json.dumps(spec))
    for i in reversed(range(len(spec["model"]["merges"]))):
        changed = json.loads(json.dumps(spec))
        changed["model"]["merges"].pop(i)
        tokenizer = Tokenizer.from_str(json.dumps(changed))
        if tokenizer.encode(probe).ids == base.encode(probe).ids and \
                tokenizer.encode(data_text).ids != base.encode(data_text).ids:
            (model / "tokenizer.json").write_text(json.dumps(changed))
            return
    pytest.skip("no merge used by the data but not by the probe")


def _strip_after_role_tokens(model, data_text):
    """Role tokens with rstrip=True absorb the whitespace after them: the rendered conversation is the
    same text, its token ids are not."""
    spec = json.loads((model / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        if token["content"] in ("<|system|>", "<|user|>", "<|assistant|>"):
            token["rstrip"] = True
    (model / "tokenizer.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("change, data", [(_drop_unprobed_merge, "standard_data"),
                                          (_strip_after_role_tokens, "conversational_data")])
def test_a_tokenizer_change_that_changes_token_ids_changes_the_identity(tiny_model_dir, change, data, request, tmp_path):
    data = request.getfixturevalue(data)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    change(changed, data.read_text())
    before = precompute(tiny_model_dir, data, tmp_path / "before")
    after = precompute(changed, data, tmp_path / "after")
    assert logps(tmp_path / "before") != logps(tmp_path / "after")  # the cached values differ...
    assert before["identity"] != after["identity"]  # ...so the identity does
    result = run("precompute", "--model", changed, "--data", data, "--out", tmp_path / "before")
    assert result.exit_code == 1 and "tokenizer differs" in result.output and "Reusing cache" not in result.output


def test_tokenizer_files_written_in_another_format_keep_the_identity(tiny_model_dir, standard_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    precompute(tiny_model_dir, standard_data, tmp_path / "cache")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_text(json.dumps(json.loads((model / name).read_text()), indent=3, sort_keys=True))
    result = run("precompute", "--model", model, "--data", standard_data, "--out", tmp_path / "cache")
    assert result.exit_code == 0 and "Reusing cache" in result.output, result.output


def test_train_accepts_its_own_tokenizer_the_day_after(tiny_model_dir, conversational_data, tmp_path, monkeypatch):
    """A template printing today's date (Llama 3.2's strftime_now("%d %b %Y")) counts by its text: the
    same tokenizer the next day is the same tokenizer."""
    import datetime as real

    from transformers.utils import chat_template_utils

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    dated = template.replace("{{ bos_token }}", "{{ bos_token }}{{ '<|system|>\nToday Date: ' + "
                                                "strftime_now('%d %b %Y') + '\n' }}", 1)
    assert dated != template
    (model / "chat_template.jinja").write_text(dated)

    def on(day):
        class Clock(real.datetime):
            @classmethod
            def now(cls, tz=None):
                return real.datetime(2026, 11, day, 12, 0, 0)
        monkeypatch.setattr(chat_template_utils, "datetime", Clock)

    on(29)
    precompute(model, conversational_data, tmp_path / "cache")
    on(30)
    result = run("train", "--cache", tmp_path / "cache", "--model", model, "--output", tmp_path / "run", "--iters", 1,
                 "--batch-size", 2)
    assert result.exit_code == 0 and "tokenizer differs" not in result.output, result.output


# ---- the tokenizer: what lives in the Python wrapper, not the backend's serialization

def _split_special(model_dir, tmp_path):
    copy = tmp_path / "model-split-special"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["split_special_tokens"] = True
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def test_split_special_tokens_changes_the_tokenizer_fingerprint(tiny_model_dir, tmp_path):
    """tokenizer_config.json's `split_special_tokens` changes every token id of text holding a special
    token (the EOS precompute appends, a template's role tokens); the probe holds none, and the flag
    lives on the wrapper. README (Identity): the fingerprint covers "the tokenizer's whole behaviour"."""
    from mlx_dpo.models import load_tokenizer
    from mlx_dpo.schemas import tokenizer_fingerprint

    plain, split = load_tokenizer(tiny_model_dir), load_tokenizer(_split_special(tiny_model_dir, tmp_path))
    text = "Hi there." + plain.eos_token  # what precompute tokenizes for a plain-text answer
    assert plain(text)["input_ids"] != split(text)["input_ids"]  # the two tokenize the data differently
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(split)


def test_a_cache_of_other_token_ids_is_not_reused_for_split_special_tokens(tiny_model_dir, tmp_path):
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: hi?", "chosen": " yes.", "rejected": " no."}
                                                          for i in range(3)])
    tiny_models.run_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c",
                        "--max-length", "64")
    result = tiny_models.run_cli("precompute", "--model", _split_special(tiny_model_dir, tmp_path), "--data", data,
                                 "--out", tmp_path / "c", "--max-length", "64", ok=False)
    assert "Reusing cache" not in result.output, result.output


def _custom_tokenizer(model_dir, folder, normalises: bool, helper: bool = False):
    """A copy of the model whose tokenizer is a Python class shipped beside it (tokenizer_config.json's
    auto_map, as Qwen-1's tokenization_qwen.py): version 2 of its code maps 'colour' to 'color' (with
    `helper`, in a file the class imports relatively)."""
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rule = f"text.replace('colour', 'color') if {normalises} else text"
    (folder / "normalise.py").write_text(f"def normalise(text):\n    return {rule if helper else 'text'}\n")
    (folder / "tokenization_custom.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n"
        + ("from .normalise import normalise\n\n" if helper else "\n")
        + "class CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    def __call__(self, text=None, *args, **kwargs):\n"
        "        if isinstance(text, str):\n"
        f"            text = {'normalise(text)' if helper else rule}\n"
        "        return super().__call__(text, *args, **kwargs)\n")
    return folder


@pytest.mark.parametrize("helper", [False, True], ids=["class-file", "imported-file"])
def test_a_custom_tokenizers_code_is_part_of_its_fingerprint(tiny_model_dir, tmp_path, helper):
    """With --trust-remote-code, a tokenizer class the model ships (auto_map) decides the ids in Python:
    its file and the files it imports relatively are in the fingerprint. README (Identity): the
    fingerprint covers "the tokenizer's whole behaviour"."""
    from mlx_dpo.models import load_tokenizer
    from mlx_dpo.schemas import tokenizer_fingerprint

    v1 = load_tokenizer(_custom_tokenizer(tiny_model_dir, tmp_path / "v1", False, helper), trust_remote_code=True)
    v2 = load_tokenizer(_custom_tokenizer(tiny_model_dir, tmp_path / "v2", True, helper), trust_remote_code=True)
    again = load_tokenizer(_custom_tokenizer(tiny_model_dir, tmp_path / "again", False, helper), trust_remote_code=True)
    text = "The colour is red."
    assert v1(text)["input_ids"] != v2(text)["input_ids"]  # the premise: the code changes the ids
    assert tokenizer_fingerprint(v1) != tokenizer_fingerprint(v2)
    assert tokenizer_fingerprint(v1) == tokenizer_fingerprint(again)  # the same code in another folder


def test_a_cache_is_not_reused_after_the_tokenizer_code_changed(tiny_model_dir, tmp_path):
    """README (Identity): "`train` checks the cache against its policy's tokenizer and refuses a mismatch";
    precompute does not reuse a cache made with other tokenizer code."""
    data = tiny_models.write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}: which colour?", "chosen": " The colour red.",
                                                           "rejected": " Blue."} for i in range(3)])
    for version, normalises in (("v1", False), ("v2", True)):
        model = _custom_tokenizer(tiny_model_dir, tmp_path / version, normalises)
        result = tiny_models.run_cli("precompute", "--model", model, "--data", data, "--out", tmp_path / "c",
                                     "--max-length", "64", "--trust-remote-code", ok=version == "v1")
    assert "Reusing cache" not in result.output, result.output


# ---- what mlx-lm loads: model code, quantization settings, tensors

def test_the_model_file_mlx_lm_runs_is_part_of_the_identity(tiny_model_dir, standard_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    code = ("from mlx_lm.models.llama import Model as _Base, ModelArgs\n"
            "SCALE = {}\n"
            "class Model(_Base):\n"
            "    def __call__(self, *a, **k):\n"
            "        return super().__call__(*a, **k) * SCALE\n")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_file": "custom.py"}))
    (model / "custom.py").write_text(code.format(1.0))
    first = precompute(model, standard_data, tmp_path / "first", "--trust-remote-code")
    (model / "custom.py").write_text(code.format(3.0))
    second = precompute(model, standard_data, tmp_path / "second", "--trust-remote-code")
    assert logps(tmp_path / "first") != logps(tmp_path / "second")
    assert first["identity"] != second["identity"]


def test_an_hf_quant_config_mlx_lm_does_not_read_keeps_the_identity(tiny_model_dir, standard_data, tmp_path):
    """mlx-lm reads hf_quant_config.json only when config.json has no quantization_config."""
    from mlx_lm import convert

    quantized = tmp_path / "q"
    convert(str(tiny_model_dir), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=4)
    assert "quantization_config" in json.loads((quantized / "config.json").read_text())
    first = precompute(quantized, standard_data, tmp_path / "first")
    (quantized / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                                "quantization": {"quant_algo": "FP8"}}))
    second = precompute(quantized, standard_data, tmp_path / "second")
    assert rows_of(tmp_path / "first") == rows_of(tmp_path / "second")  # mlx-lm did not read it
    assert first["identity"] == second["identity"]


def test_the_same_tensors_saved_again_are_the_reference(standard_cache, tiny_model_dir, tmp_path):
    """Other file bytes (tensor order, metadata), the same tensors: train starts at exactly ln 2 and
    does not call the policy other weights."""
    import mlx.core as mx

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    weights = mx.load(str(policy / "model.safetensors"))
    mx.save_safetensors(str(policy / "model.safetensors"), weights, metadata={"format": "pt"})
    assert (policy / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    result = run("train", "--cache", standard_cache, "--model", policy, "--output", tmp_path / "run", "--iters", 1,
                 "--batch-size", 4, "--steps-per-report", 1)
    assert result.exit_code == 0, result.output
    first = next(json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"train"' in line)
    assert abs(first["loss"] - 0.6931471805599453) < 1e-6  # it IS the reference
    assert "are not the cache's reference" not in result.output, result.output


def test_the_tensors_hash_reads_names_dtypes_shapes_and_every_data_byte(tiny_model_dir, tmp_path):
    import mlx.core as mx

    from mlx_dpo.models import tensors_hash

    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    names = sorted(weights)
    mx.save_safetensors(str(tmp_path / "a.safetensors"), {n: weights[n] for n in names[: len(names) // 2]})
    mx.save_safetensors(str(tmp_path / "b.safetensors"), {n: weights[n] for n in names[len(names) // 2:]})
    base = tensors_hash([tiny_model_dir / "model.safetensors"])
    assert tensors_hash([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) == base  # split in two files
    changes = {"one value": {**weights, names[0]: weights[names[0]] + 1e-3},
               "dtype": {**weights, names[0]: weights[names[0]].astype(mx.float16)},
               "shape": {**weights, names[0]: weights[names[0]].reshape(-1)},
               "name": {**{n: weights[n] for n in names[1:]}, names[0] + "x": weights[names[0]]}}
    for what, changed in changes.items():
        mx.save_safetensors(str(tmp_path / "c.safetensors"), changed)
        assert tensors_hash([tmp_path / "c.safetensors"]) != base, what
    data = (tiny_model_dir / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match="cut.safetensors: tensor .* is cut short"):
        tensors_hash([tmp_path / "cut.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="junk.safetensors: not a readable safetensors file"):
        tensors_hash([tmp_path / "junk.safetensors"])


def test_a_sentencepiece_tokenizer_is_fingerprinted_by_its_model_file(tmp_path):
    """A tokenizer without a `tokenizers` backend (SentencePiece): its model file is hashed, so a change
    the vocabulary does not show (a piece's score, which decides segmentation) changes the fingerprint."""
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2
    from transformers import BertGenerationTokenizer

    from mlx_dpo.schemas import tokenizer_fingerprint

    (tmp_path / "corpus.txt").write_text("\n".join(f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "a"), vocab_size=50,
                                   model_type="bpe", minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "a.model").read_bytes())
    proto.pieces[10].score -= 5
    (tmp_path / "b.model").write_bytes(proto.SerializeToString())
    a, b = (BertGenerationTokenizer(vocab_file=str(tmp_path / f"{n}.model")) for n in "ab")
    assert not hasattr(a, "backend_tokenizer") and a.get_vocab() == b.get_vocab()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(BertGenerationTokenizer(vocab_file=str(tmp_path / "a.model")))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


# ---- the data: datasets keeps a converted Arrow copy of a local file, known by its path and mtime only

MTIME_NS = 1_000_000_000  # 1970-01-01 00:00:01, the Nix store's mtime; tar, rsync -a and cp -p keep a source's too


def _answers(answer: str) -> list[dict]:
    return [{"prompt": f"Question {i}: what is the answer?", "chosen": f" {answer} {i}.", "rejected": f" no {i}."}
            for i in range(4)]


def _write_same_mtime(data, answer):
    """`data` (.jsonl, .parquet, or a folder holding train.jsonl) rewritten with other rows, old mtime."""
    import pyarrow as pa

    file = data / "train.jsonl" if data.suffix == "" else data
    if file.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(_answers(answer)), file)
    else:
        tiny_models.write_jsonl(file, _answers(answer))
    os.utime(file, ns=(MTIME_NS, MTIME_NS))


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.parquet", "folder"])
def test_a_file_rewritten_with_the_same_mtime_is_cached_as_its_new_rows(tiny_model_dir, tmp_path, name):
    """README (Identity): "the content of the input columns the run reads" is part of the identity:
    a data file rewritten with the same mtime (cp -p, rsync -a, tar, SOURCE_DATE_EPOCH) is read as its
    new rows, for the values cached and for the identity."""
    from mlx_dpo.models import load_tokenizer

    data = tmp_path / name
    _write_same_mtime(data, "yes")
    precompute(tiny_model_dir, data, tmp_path / "a", "--max-length", "64")
    _write_same_mtime(data, "absolutely certainly")  # other answers, another size, the same mtime
    precompute(tiny_model_dir, data, tmp_path / "b", "--max-length", "64", "--no-reuse")
    cached = load_tokenizer(tiny_model_dir).decode(rows_of(tmp_path / "b")[0]["chosen_ids"])
    assert "absolutely" in cached, f"cache b, made from the new file, holds the old file's answer {cached!r}"
    again = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "a", "--max-length", "64")
    assert "Reusing cache" not in again.output, again.output  # "different inputs into the same --out are refused"


def test_the_same_data_reruns_from_the_same_conversion(tiny_model_dir, tmp_path):
    """A rerun on unchanged data reuses its cache and datasets' conversion of the file (one per content)."""
    import datasets

    data = tmp_path / "prefs.jsonl"
    _write_same_mtime(data, "yes")
    conversions = Path(datasets.config.HF_DATASETS_CACHE) / "mlx_dpo"
    before = set(conversions.iterdir()) if conversions.is_dir() else set()
    precompute(tiny_model_dir, data, tmp_path / "a", "--max-length", "64")
    again = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "a", "--max-length", "64")
    assert "Reusing cache" in again.output, again.output
    precompute(tiny_model_dir, data, tmp_path / "b", "--max-length", "64")
    assert len(set(conversions.iterdir()) - before) <= 1
