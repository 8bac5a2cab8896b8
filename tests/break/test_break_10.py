"""Breaks of issue 10 ("The reference cache tells the truth"), found by review. Each test goes
through the real CLI and fails on the change under review (4040d07..ba5c122)."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mlx_dpo.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def precompute(model, data, out, *extra):
    result = run("precompute", "--model", model, "--data", data, "--out", out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def rows_of(cache):
    return {split.name: sorted(pq.read_table(sorted(split.glob("part-*.parquet"))).to_pylist(), key=lambda r: r["index"])
            for split in sorted(cache.iterdir()) if split.is_dir()}


def logps(cache):
    return [(r["index"], r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in rows_of(cache)["train"]]


# ---- item 2: the identity hashes what the loader reads (the tokenizer)

def _drop_unprobed_merge(model, data_text):
    """Remove one BPE merge from tokenizer.json that the fingerprint's probe string never uses but the
    data does: vocabulary, special tokens, chat template and probe ids stay the same, token ids of
    the data change."""
    from tokenizers import Tokenizer

    from mlx_dpo.schemas.identity import _PROBE

    spec = json.loads((model / "tokenizer.json").read_text())
    base = Tokenizer.from_str(json.dumps(spec))
    for i in reversed(range(len(spec["model"]["merges"]))):
        changed = json.loads(json.dumps(spec))
        changed["model"]["merges"].pop(i)
        tokenizer = Tokenizer.from_str(json.dumps(changed))
        if tokenizer.encode(_PROBE).ids == base.encode(_PROBE).ids and \
                tokenizer.encode(data_text).ids != base.encode(data_text).ids:
            (model / "tokenizer.json").write_text(json.dumps(changed))
            return
    pytest.skip("no merge used by the data but not by the probe")


def _strip_after_role_tokens(model, data_text):
    """Give the chat template's role tokens rstrip=True (the whitespace after them is absorbed): the
    rendered probe conversation is the same text, its token ids are not."""
    spec = json.loads((model / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        if token["content"] in ("<|system|>", "<|user|>", "<|assistant|>"):
            token["rstrip"] = True
    (model / "tokenizer.json").write_text(json.dumps(spec))


# item 2: a tokenizer change the fingerprint misses (BPE merges; added-token lstrip/rstrip flags)
@pytest.mark.parametrize("change, data", [(_drop_unprobed_merge, "standard_data"),
                                          (_strip_after_role_tokens, "conversational_data")])
def test_break_item2_a_tokenizer_change_that_changes_token_ids_changes_the_identity(
        tiny_model_dir, change, data, request, tmp_path):
    data = request.getfixturevalue(data)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    change(changed, data.read_text())
    before = precompute(tiny_model_dir, data, tmp_path / "before")
    after = precompute(changed, data, tmp_path / "after")
    assert logps(tmp_path / "before") != logps(tmp_path / "after")  # the cached values differ...
    assert before["identity"] != after["identity"]  # ...so the identity must (today: same; reused)
    result = run("precompute", "--model", changed, "--data", data, "--out", tmp_path / "before")
    assert "Reusing cache" not in result.output


# item 2: with --trust-remote-code, the config's `model_file` (Python code mlx-lm runs to build the
# model) decides the values, but is not hashed
def test_break_item2_the_model_file_mlx_lm_loads_is_part_of_the_identity(tiny_model_dir, standard_data, tmp_path):
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


# ---- item 4 / README "When things go wrong" (--overwrite row): "Without it, a damaged cache of the
# same identity is named, not reused"

def _flip_a_data_byte(cache):
    shard = cache / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside the first data page: size and footer unchanged
    shard.write_bytes(bytes(data))


def _delete_rejects_file(cache):
    (cache / "rejects.jsonl").unlink()


@pytest.mark.parametrize("damage", [_flip_a_data_byte, _delete_rejects_file])
def test_break_item4_a_damaged_cache_of_the_same_identity_is_not_reused(
        standard_cache, tiny_model_dir, standard_data, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    damage(cache)
    assert run("cache", "verify", cache).exit_code == 1  # verify calls it damaged: "rebuild it with --overwrite"
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", cache,
                 "--max-length", 22, "--rows-per-shard", 5)
    assert "Reusing cache" not in result.output, result.output


# ---- item 7: no command reads outside the cache (a manifest.json that is a symbolic link)

@pytest.mark.parametrize("command", ["verify", "inspect", "train"])
def test_break_item7_readers_refuse_a_manifest_behind_a_symbolic_link(standard_cache, tiny_model_dir, tmp_path, command):
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copytree(standard_cache / "train", cache / "train")
    shutil.copy(standard_cache / "rejects.jsonl", cache / "rejects.jsonl")
    outside = tmp_path / "elsewhere" / "manifest.json"
    outside.parent.mkdir()
    shutil.copy(standard_cache / "manifest.json", outside)
    (cache / "manifest.json").symlink_to(outside)
    # precompute refuses this very folder ("a symbolic link inside the cache; a cache holds plain files only")
    args = {"verify": ["cache", "verify", cache], "inspect": ["cache", "inspect", cache],
            "train": ["train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / "run", "--iters", 1]}
    result = run(*args[command])
    assert result.exit_code == 1 and "symbolic link" in result.output, result.output


# ---- item 3: resume never mixes shard plans (a shard's rejects sidecar from another plan)

def test_break_item3_resume_never_reuses_a_rejects_sidecar_of_another_plan(tiny_model_dir, standard_data, tmp_path):
    """The state a kill leaves: run A (--rows-per-shard 5) wrote every shard and died before the
    manifest; run B (--rows-per-shard 10) rewrote train/part-00000.rejects.jsonl for its rows 0..9 and
    died before its part-00000.parquet. Run A again: part-00000.parquet has A's row range, so the
    shard counts as complete with B's sidecar, and rows 5..9's rejects are counted twice."""
    args = ["--max-length", 22]
    fresh, out, other = tmp_path / "fresh", tmp_path / "out", tmp_path / "other"
    precompute(tiny_model_dir, standard_data, fresh, *args, "--rows-per-shard", 5)
    shutil.copytree(fresh, out)
    (out / "manifest.json").unlink()
    (out / "rejects.jsonl").unlink()
    precompute(tiny_model_dir, standard_data, other, *args, "--rows-per-shard", 10)
    shutil.copy(other / "train" / "part-00000.rejects.jsonl", out / "train" / "part-00000.rejects.jsonl")

    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out, *args,
                 "--rows-per-shard", 5)
    assert result.exit_code == 0, result.output  # today: "row 5 is there 2 times ... re-run with --overwrite"
    assert rows_of(out) == rows_of(fresh)
    assert sorted((out / "rejects.jsonl").read_text().splitlines()) == \
        sorted((fresh / "rejects.jsonl").read_text().splitlines())


# ---- item 2 (tokenizer fingerprint) / README "train checks the cache against its policy's tokenizer":
# the fingerprint now renders a probe conversation, so a template that prints today's date (as
# Llama 3.2's does with strftime_now("%d %b %Y")) gives the same tokenizer another fingerprint the
# next day, and train refuses the cache it was precomputed with ("precomputed with another tokenizer")

def test_break_item2_train_accepts_its_own_tokenizer_the_day_after(tiny_model_dir, conversational_data, tmp_path,
                                                                    monkeypatch):
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
    on(30)  # the same model directory, the same tokenizer files, one day later
    result = run("train", "--cache", tmp_path / "cache", "--model", model, "--output", tmp_path / "run", "--iters", 1,
                 "--batch-size", 2)
    assert "tokenizer differs" not in result.output, result.output
    assert result.exit_code == 0, result.output


# ---- item 7: `cache merge` reads a job's shards through a symbolic link (precompute refuses one there)

def test_break_item7_merge_refuses_a_part_whose_split_folder_is_a_symbolic_link(tiny_model_dir, standard_data, tmp_path):
    parts = [tmp_path / "p0", tmp_path / "p1"]
    for i, part in enumerate(parts):
        result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", part,
                     "--rows-per-shard", 5, "--num-shards", 2, "--shard-index", i)
        assert result.exit_code == 0, result.output
    outside = tmp_path / "elsewhere"
    (parts[1] / "train").rename(outside)
    (parts[1] / "train").symlink_to(outside)
    result = run("cache", "merge", tmp_path / "merged", *parts)
    assert result.exit_code == 1 and "symbolic link" in result.output, result.output


# ---- item 8 (debatable: the issue says "compares the weights hash", the README "a policy with other
# weights ... is named"): the same tensors saved again (other safetensors bytes) are named as other
# weights, and step 1 is exactly ln 2 all the same

def test_break_item8_the_same_weights_saved_again_are_not_named_other_weights(standard_cache, tiny_model_dir, tmp_path):
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


# ---- item 2: "exactly what the loader reads": mlx-lm reads hf_quant_config.json only when config.json
# has no quantization_config (mlx_lm.utils.load_model); beside a config that has one it is not read,
# yet it changes the identity, and the same values are refused as "other inputs"

def test_break_item2_an_hf_quant_config_mlx_lm_does_not_read_keeps_the_identity(tiny_model_dir, standard_data, tmp_path):
    from mlx_lm import convert

    quantized = tmp_path / "q"
    convert(str(tiny_model_dir), mlx_path=str(quantized), quantize=True, q_group_size=32, q_bits=4)
    assert "quantization_config" in json.loads((quantized / "config.json").read_text())
    first = precompute(quantized, standard_data, tmp_path / "first")
    (quantized / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                                "quantization": {"quant_algo": "FP8"}}))
    second = precompute(quantized, standard_data, tmp_path / "second")
    assert rows_of(tmp_path / "first") == rows_of(tmp_path / "second")  # mlx-lm did not read it
    assert first["identity"] == second["identity"], json.dumps([first["identity_fields"]["reference_weights"],
                                                                second["identity_fields"]["reference_weights"]])
