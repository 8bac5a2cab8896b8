"""The cache tells the truth (issue 10): its identity covers what changes the values and nothing
else; no precompute writes rows missing or doubled, or deletes files that are not the cache's."""

import json
import shutil

import pyarrow.parquet as pq
import pytest

import tiny_models
from conftest import atomic_temp_name
from mlx_dpo.models import weights_hash

run = tiny_models.invoke_cli


def manifest_of(cache):
    return json.loads((cache / "manifest.json").read_text())


def read_rows(cache, split="train"):
    table = pq.read_table(sorted((cache / split).glob("part-*.parquet")))
    return sorted(table.to_pylist(), key=lambda r: r["index"])


def standard_args(model, data, out, *extra):
    """The options conftest's standard_cache was built with."""
    return ["precompute", "--model", model, "--data", data, "--out", out, "--max-length", 22, "--rows-per-shard", 5,
            *extra]


@pytest.fixture(scope="module")
def bf16_model(tiny_model_dir, tmp_path_factory):
    """The tiny model stored in bfloat16, as most hub checkpoints are."""
    import mlx.core as mx

    directory = tmp_path_factory.mktemp("bf16") / "model"
    shutil.copytree(tiny_model_dir, directory)
    weights = mx.load(str(directory / "model.safetensors"))
    mx.save_safetensors(str(directory / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return directory


# ---- 1. compute precision is part of the identity

def test_dtype_is_part_of_the_identity_and_changes_the_values(bf16_model, standard_data, tmp_path):
    outs = {name: tmp_path / name for name in ("default", "float32", "bfloat16")}
    for name, out in outs.items():
        extra = [] if name == "default" else ["--dtype", name]
        result = run("precompute", "--model", bf16_model, "--data", standard_data, "--out", out, *extra)
        assert result.exit_code == 0, result.output
    manifests = {name: manifest_of(out) for name, out in outs.items()}
    assert manifests["default"]["identity_fields"]["dtype"] == "float32"  # the default on CPU
    assert manifests["bfloat16"]["identity_fields"]["dtype"] == "bfloat16"
    assert manifests["default"]["identity"] == manifests["float32"]["identity"] != manifests["bfloat16"]["identity"]
    f32, bf16 = read_rows(outs["float32"]), read_rows(outs["bfloat16"])
    assert [r["chosen_ids"] for r in f32] == [r["chosen_ids"] for r in bf16]
    assert max(abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) for a, b in zip(f32, bf16)) > 1e-3
    # A rerun into the bf16 cache without --dtype computes in float32: another cache, refused.
    result = run("precompute", "--model", bf16_model, "--data", standard_data, "--out", outs["bfloat16"])
    assert result.exit_code == 1 and "dtype differs: cache bfloat16, this run float32" in result.output


def test_default_dtype_is_float32_on_cpu_and_the_checkpoints_elsewhere(bf16_model, tiny_model_dir, monkeypatch):
    import mlx.core as mx

    from mlx_dpo.models import checkpoint_dtype, compute_dtype

    assert (checkpoint_dtype(bf16_model), checkpoint_dtype(tiny_model_dir)) == ("bfloat16", "float32")
    assert compute_dtype(bf16_model) == "float32" and compute_dtype(bf16_model, "float16") == "float16"
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # as on Metal or CUDA
    assert compute_dtype(bf16_model) == "bfloat16"


# ---- 2. the identity hashes exactly what the loader reads, and the rows the run uses

def test_weights_hash_covers_what_mlx_lm_loads(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    base = weights_hash(model)
    (model / "adapters.safetensors").write_bytes(b"not loaded by mlx_lm.load")  # a stray file beside it
    (model / "notes.txt").write_text("also not loaded")
    assert weights_hash(model) == base
    (model / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "NVFP4"}}')  # read by mlx-lm
    assert weights_hash(model) != base
    (model / "hf_quant_config.json").unlink()
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert weights_hash(model) != base


def test_a_weight_file_named_in_the_index_must_be_there(tiny_model_dir, tmp_path):
    from mlx_dpo.errors import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="model-00001-of-00002.safetensors is named in model.safetensors.index.json"):
        weights_hash(model)


def test_tokenizer_fingerprint_covers_the_chat_template(tiny_model_dir):
    from mlx_dpo.models import load_tokenizer
    from mlx_dpo.schemas import tokenizer_fingerprint

    tokenizer = load_tokenizer(tiny_model_dir)
    base = tokenizer_fingerprint(tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("'<|assistant|>", "'<|assistant|> ")
    assert tokenizer_fingerprint(tokenizer) != base


def test_identity_names_tokenization_rules_and_dtype(standard_cache):
    fields = manifest_of(standard_cache)["identity_fields"]
    assert fields["tokenization_rules"] >= 1 and fields["dtype"] == "float32"
    assert "fields" not in fields["options"]  # column names are not values: the rows' content is hashed


def test_unused_columns_and_an_absent_system_column_keep_the_identity(standard_cache, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    rows = [{**row, "score": i * 7, "source": f"site {i}"} for i, row in enumerate(tiny_models.standard_rows())]
    data = tiny_models.write_jsonl(tmp_path / "more-columns.jsonl", rows)
    result = run(*standard_args(tiny_model_dir, data, cache))  # no system column (one named by an option must exist)
    assert result.exit_code == 0 and "Reusing cache" in result.output, result.output
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in tiny_models.standard_rows()]
    data = tiny_models.write_jsonl(tmp_path / "renamed.jsonl", renamed)
    result = run(*standard_args(tiny_model_dir, data, cache, "--prompt-field", "question", "--chosen-field", "good",
                                "--rejected-field", "bad"))
    assert result.exit_code == 0 and "Reusing cache" in result.output, result.output
    changed = tiny_models.standard_rows()
    changed[3]["chosen"] += " Really."
    data = tiny_models.write_jsonl(tmp_path / "changed.jsonl", changed)
    result = run(*standard_args(tiny_model_dir, data, cache))
    assert result.exit_code == 1 and "data.train differs" in result.output


# ---- 3. resume never mixes shard plans

@pytest.fixture(scope="module")
def rows_48(tmp_path_factory):
    rows = [{**r, "prompt": f"{i} {r['prompt']}"} for i in range(4) for r in tiny_models.standard_rows()]
    return tiny_models.write_jsonl(tmp_path_factory.mktemp("rows48") / "rows.jsonl", rows)


@pytest.mark.parametrize("first, second", [(16, 8), (8, 16)])
def test_resume_with_another_shard_size_caches_each_row_once(tiny_model_dir, rows_48, tmp_path, first, second):
    def args(out, rows_per_shard):
        return ["precompute", "--model", tiny_model_dir, "--data", rows_48, "--out", out, "--max-length", 24,
                "--rows-per-shard", rows_per_shard]

    killed, clean = tmp_path / "killed", tmp_path / "clean"
    assert run(*args(killed, first)).exit_code == 0
    (killed / "manifest.json").unlink()  # as if killed after its first two shards
    for path in killed.glob("train/part-*"):
        if not path.name.startswith(("part-00000.", "part-00001.")):
            path.unlink()
    result = run(*args(killed, second))
    assert result.exit_code == 0, result.output
    assert "48 rows:" in result.output and "cached" in result.output
    assert run(*args(clean, second)).exit_code == 0
    assert read_rows(killed) == read_rows(clean)
    assert (killed / "rejects.jsonl").read_text() == (clean / "rejects.jsonl").read_text()
    assert sorted(p.name for p in killed.rglob("*")) == sorted(p.name for p in clean.rglob("*"))
    result = run("cache", "verify", killed)
    assert result.exit_code == 0, result.output


def test_resume_never_reuses_a_rejects_sidecar_of_another_plan(tiny_model_dir, standard_data, tmp_path):
    """The state kills leave: run A (--rows-per-shard 5) wrote every shard and died before the
    manifest; run B (--rows-per-shard 10) rewrote train/part-00000.rejects.jsonl for its rows 0..9 and
    died before its part-00000.parquet. Run A again: the sidecar is recomputed, not paired with A's
    shard (which would count rows 5..9's rejects twice)."""
    fresh, out, other = tmp_path / "fresh", tmp_path / "out", tmp_path / "other"
    assert run(*standard_args(tiny_model_dir, standard_data, fresh)).exit_code == 0
    shutil.copytree(fresh, out)
    (out / "manifest.json").unlink()
    (out / "rejects.jsonl").unlink()
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", other, "--max-length", 22,
                 "--rows-per-shard", 10)
    assert result.exit_code == 0, result.output
    shutil.copy(other / "train" / "part-00000.rejects.jsonl", out / "train" / "part-00000.rejects.jsonl")
    result = run(*standard_args(tiny_model_dir, standard_data, out))
    assert result.exit_code == 0, result.output
    assert read_rows(out) == read_rows(fresh)
    assert sorted((out / "rejects.jsonl").read_text().splitlines()) == \
        sorted((fresh / "rejects.jsonl").read_text().splitlines())


def test_no_manifest_unless_every_row_is_there_exactly_once(standard_cache, tiny_model_dir, standard_data, tmp_path):
    """A shard that claims its place in the plan but holds another shard's rows: caught before the manifest."""
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    (cache / "manifest.json").unlink()
    first, second = cache / "train" / "part-00000.parquet", cache / "train" / "part-00001.parquet"
    metadata = pq.read_schema(first).metadata
    table = pq.read_table(second)
    pq.write_table(table.replace_schema_metadata(metadata), first)  # shard 1's rows, shard 0's label
    result = run(*standard_args(tiny_model_dir, standard_data, cache))
    assert result.exit_code == 1
    assert "do not cover input rows 0..11 exactly once" in result.output and "2 times" in result.output
    assert not (cache / "manifest.json").exists()


# ---- 4. --overwrite rebuilds, and deletes only cache files

def test_overwrite_rebuilds_a_damaged_cache(standard_cache, tiny_model_dir, standard_data, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    shard = cache / "train" / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:50])
    result = run(*standard_args(tiny_model_dir, standard_data, cache))
    assert result.exit_code == 1 and f"{shard}: 50 bytes" in result.output and "--overwrite" in result.output
    result = run(*standard_args(tiny_model_dir, standard_data, cache, "--overwrite"))
    assert result.exit_code == 0 and "Reusing" not in result.output, result.output
    assert run("cache", "verify", cache).exit_code == 0
    assert read_rows(cache) == read_rows(standard_cache)


def _flip_a_data_byte(cache):
    shard = cache / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside the first data page: size and footer unchanged
    shard.write_bytes(bytes(data))


def _delete_the_rejects_file(cache):
    (cache / "rejects.jsonl").unlink()


@pytest.mark.parametrize("damage, named", [(_flip_a_data_byte, "part-00000.parquet: sha256 differs"),
                                           (_delete_the_rejects_file, "rejects.jsonl: unreadable rejects file")])
def test_a_damaged_cache_of_the_same_identity_is_named_not_reused(standard_cache, tiny_model_dir, standard_data,
                                                                  tmp_path, damage, named):
    """Reuse runs the whole of `cache verify` (sha256 of every file, values, row accounting)."""
    cache = tmp_path / "cache"
    shutil.copytree(standard_cache, cache)
    damage(cache)
    assert run("cache", "verify", cache).exit_code == 1
    result = run(*standard_args(tiny_model_dir, standard_data, cache))
    assert result.exit_code == 1 and "Reusing cache" not in result.output, result.output
    assert named in result.output and "the cache is damaged; rebuild it with --overwrite" in result.output


def test_tokens_per_batch_changes_no_value(tiny_model_dir, standard_data, tmp_path):
    """Another --tokens-per-batch groups sequences differently: token ids, counts, rejects and log-probs
    are the same, bit for bit (test_batch_invariance.py), so it is not part of the identity."""
    small, large = tmp_path / "small", tmp_path / "large"
    for out, budget in ((small, 32), (large, 8192)):
        assert run(*standard_args(tiny_model_dir, standard_data, out, "--tokens-per-batch", budget)).exit_code == 0
    assert manifest_of(small)["identity"] == manifest_of(large)["identity"]
    assert (small / "rejects.jsonl").read_text() == (large / "rejects.jsonl").read_text()
    assert read_rows(small) == read_rows(large)


def test_overwrite_deletes_only_cache_files(standard_cache, tiny_model_dir, standard_data, tmp_path):
    out = tmp_path / "project"
    shutil.copytree(standard_cache, out)
    foreign = {"notes/thesis.tex": "\\chapter{One}", "notes/part-00000.parquet": "a file of mine",
               "README.txt": "keep", "train/my-notes.txt": "mine too", "part-00000.parquet": "top level"}
    for name, text in foreign.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    result = run("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out, "--max-length", 40,
                 "--rows-per-shard", 8, "--overwrite")
    assert result.exit_code == 0, result.output
    assert {name: (out / name).read_text() for name in foreign} == foreign
    assert sorted(p.name for p in (out / "train").glob("part-*")) == [
        "part-00000.parquet", "part-00000.rejects.jsonl", "part-00001.parquet", "part-00001.rejects.jsonl"]
    assert manifest_of(out)["max_length"] == 40
    assert run("cache", "verify", out).exit_code == 0


# ---- 5. --valid-fraction keeps input positions everywhere

def ten_rows_two_bad(path, bad=(2, 7)):
    rows = [{"prompt": f"Question {i}: what is two plus two?\nAnswer:", "chosen": "" if i in bad else f" four {i}.",
             "rejected": f" five {i}."} for i in range(10)]
    return tiny_models.write_jsonl(path, rows)


def test_valid_fraction_rejects_name_input_rows(tiny_model_dir, tmp_path):
    data = ten_rows_two_bad(tmp_path / "ten.jsonl")
    out = tmp_path / "cache"
    result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", out, "--valid-fraction", 0.3)
    assert result.exit_code == 0, result.output
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rejects) == [2, 7]
    assert all(r["reason"] == "empty chosen" for r in rejects)
    cached = [r["index"] for split in ("train", "valid") for r in read_rows(out, split)]
    assert sorted(cached) == [0, 1, 3, 4, 5, 6, 8, 9]
    result = run("cache", "verify", out)
    assert result.exit_code == 0, result.output
    result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "s",
                 "--valid-fraction", 0.3, "--strict")
    assert result.exit_code == 1
    assert "row 2: empty chosen" in result.output or "row 7: empty chosen" in result.output, result.output


def test_valid_fraction_cache_without_bad_rows_verifies(tiny_model_dir, tmp_path):
    from mlx_dpo.trainer.run import open_cache

    data = ten_rows_two_bad(tmp_path / "ten.jsonl", bad=())
    out = tmp_path / "cache"
    assert run("precompute", "--model", tiny_model_dir, "--data", data, "--out", out, "--valid-fraction", 0.3).exit_code == 0
    result = run("cache", "verify", out)
    assert result.exit_code == 0, result.output
    open_cache(str(out), full=True)  # what train --verify-cache runs


# ---- 6. a split with no cached rows is an error

def test_a_split_with_no_cached_rows_is_an_error(tiny_model_dir, tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": " same", "rejected": " same"} for i in range(5)]
    rows += [{"prompt": f"R{i}", "chosen": "", "rejected": " no"} for i in range(2)]
    data = tiny_models.write_jsonl(tmp_path / "all-bad.jsonl", rows)
    out = tmp_path / "cache"
    result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", out)
    assert result.exit_code == 1
    assert (f"{out} [train]: none of its 7 rows could be cached (5 chosen identical to rejected, 2 empty chosen); "
            f"each row's reason is in {out / 'rejects.jsonl'}") in result.output
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 7 and not (out / "manifest.json").exists()
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# ---- 9. durable writes: every file and folder of a cache is fsynced before it counts

def test_every_cache_file_and_folder_is_fsynced(tiny_model_dir, standard_data, tmp_path, fsynced):
    out = tmp_path / "cache"
    assert run(*standard_args(tiny_model_dir, standard_data, out)).exit_code == 0
    names = {p.rsplit("/", 1)[-1] for p in fsynced}  # files are synced under their temp names
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(atomic_temp_name(p) in names for p in files), sorted(names)
    assert {str(tmp_path), str(out), str(out / "train")} <= set(fsynced)  # new folders and the renames
