"""--adapter-path: SFT with mlx_lm.lora, then DPO with the SFT model as reference and starting point."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pyarrow.parquet as pq
import pytest

import tiny_models
from tiny_models import run_cli

SFT_RANK = 4  # not our default (8): the run must take the adapters' rank


@pytest.fixture(scope="module")
def sft_adapters(tiny_model_dir, tmp_path_factory):
    """Adapters from mlx-lm's own LoRA trainer (a few steps at a high learning rate, so they matter)."""
    root = tmp_path_factory.mktemp("sft")
    data = root / "data"
    data.mkdir()
    texts = [{"text": f"{r['prompt']}{r['chosen']}"} for r in tiny_models.standard_rows()]
    for name in ("train", "valid"):
        tiny_models.write_jsonl(data / f"{name}.jsonl", texts)
    (root / "sft.yaml").write_text(f"lora_parameters: {{rank: {SFT_RANK}, scale: 10.0, dropout: 0.0}}\n")
    subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--model", str(tiny_model_dir), "--train",
                    "--data", str(data), "--iters", "4", "--batch-size", "2", "--num-layers", "2",
                    "--learning-rate", "1e-2", "--val-batches", "1", "--steps-per-eval", "100",
                    "--adapter-path", str(root / "adapters"), "-c", str(root / "sft.yaml")],
                   check=True, capture_output=True)
    return root / "adapters"


@pytest.fixture(scope="module")
def sft_cache(tiny_model_dir, standard_data, sft_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-cache") / "cache"
    run_cli("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", out,
         "--max-length", 22, "--rows-per-shard", 5, "--adapter-path", sft_adapters)
    return out


def _rows(cache):
    rows = [r for p in sorted(cache.glob("train/part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: r["index"])


def _mlx_lm_logps(model_dir, adapter_path, rows):
    """Each row's chosen log-prob from mlx_lm.load(model, adapter_path=...) itself, one sequence at a time."""
    import mlx_lm

    from mlx_dpo.schemas.sequence import truncate_sequence

    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    model.set_dtype(mx.float32)
    out = []
    for row in rows:
        ids, mask = truncate_sequence(row["prompt_ids"], row["chosen_ids"], 22, "keep_start")
        logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
        logps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = np.array(logps)[np.arange(len(ids) - 1), ids[1:]]
        out.append(float((picked * np.array(mask[1:])).sum()))
    return out


def test_reference_is_the_model_with_the_adapters(tiny_model_dir, sft_adapters, sft_cache, standard_cache):
    rows, base_rows = _rows(sft_cache), _rows(standard_cache)
    ours = [r["ref_chosen_logps"] for r in rows]
    expected = _mlx_lm_logps(tiny_model_dir, sft_adapters, rows)
    base = _mlx_lm_logps(tiny_model_dir, None, rows)
    assert np.allclose(ours, expected, atol=1e-4)
    assert np.abs(np.array(ours) - np.array(base)).max() > 0.05  # the adapters do change the reference
    assert [r["ref_chosen_logps"] for r in base_rows] == pytest.approx(base, abs=1e-4)
    fields = json.loads((sft_cache / "manifest.json").read_text())["identity_fields"]
    assert len(fields["reference_adapters"]) == 64
    assert "reference_adapters" not in json.loads((standard_cache / "manifest.json").read_text())["identity_fields"]


def test_training_continues_on_the_adapters(tiny_model_dir, sft_adapters, sft_cache, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--cache", sft_cache, "--model", tiny_model_dir, "--adapter-path", sft_adapters,
                  "--output", run, "--iters", 6, "--batch-size", 2, "--learning-rate", 1e-2,
                  "--steps-per-report", 1, "--steps-per-save", 6)
    assert "Note: policy" not in result.output
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == SFT_RANK and config["num_layers"] == 2
    # The run's adapters alone (on the base model) are the trained policy: SFT adapters moved on.
    rows = _rows(sft_cache)
    after = _mlx_lm_logps(tiny_model_dir, run, rows)
    before = _mlx_lm_logps(tiny_model_dir, sft_adapters, rows)
    assert np.abs(np.array(after) - np.array(before)).max() > 1e-3


def test_conflicting_lora_options_are_refused(tiny_model_dir, sft_adapters, sft_cache, tmp_path):
    result = run_cli("train", "--cache", sft_cache, "--model", tiny_model_dir, "--adapter-path", sft_adapters,
                     "--output", tmp_path / "run", "--lora-rank", 16, ok=False)
    assert result.exit_code != 0
    assert f"--lora-rank 16: the adapters in {sft_adapters} have {SFT_RANK}" in result.output


def test_a_starting_point_other_than_the_reference_is_said(tiny_model_dir, sft_adapters, sft_cache,
                                                          standard_cache, tmp_path):
    """One line each way: base policy on the SFT cache, SFT policy on the base cache."""
    for cache, extra in ((sft_cache, []), (standard_cache, ["--adapter-path", sft_adapters])):
        result = run_cli("train", "--cache", cache, "--model", tiny_model_dir, "--output", tmp_path / cache.parent.name,
                      "--iters", 1, "--batch-size", 2, *extra)
        notes = [line for line in result.output.splitlines() if line.startswith("Note: policy")]
        assert len(notes) == 1 and "its adapters" in notes[0] and "weights" not in notes[0], result.output


def test_the_starting_point_note_is_the_line_the_readme_quotes(tiny_model_dir, sft_adapters, standard_cache, tmp_path):
    """The README's 'Starting points' quotes the note; the real one differs only in the model path
    and the adapters' fingerprint."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quoted = " ".join(re.search(r"says so in one line:\s*`(Note:[^`]*)`", readme).group(1).split())
    result = run_cli("train", "--cache", standard_cache, "--model", tiny_model_dir, "--adapter-path", sft_adapters,
                     "--output", tmp_path / "run", "--iters", 1, "--batch-size", 2)
    (note,) = [line for line in result.output.splitlines() if line.startswith("Note:")]

    def general(line):
        return re.sub(r"\b[0-9a-f]{12}…", "HASH…", line)

    assert general(note.replace(str(tiny_model_dir), "M")) == general(quoted), (note, quoted)


def test_missing_adapter_directory_is_one_line(tiny_model_dir, standard_data, tmp_path):
    result = run_cli("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "c",
                     "--adapter-path", tmp_path / "nowhere", ok=False)
    assert result.exit_code != 0 and "--adapter-path" in result.output and "no such directory" in result.output


def _adapters(directory, config, weights):
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(directory / "adapters.safetensors"), weights)
    return directory


LORA_CONFIG = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}


def test_adapters_of_another_model_are_one_line(tiny_model_dir, standard_data, tmp_path):
    """mlx-lm's message has a line per tensor; ours names the directory, the count and the first."""
    weights = {f"model.layers.{layer}.self_attn.{proj}.lora_a": mx.zeros((32, 4))  # hidden size 32, not 64
               for layer in (0, 1) for proj in ("q_proj", "k_proj")}
    adapters = _adapters(tmp_path / "adapters", LORA_CONFIG, weights)
    result = run_cli("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "c",
                     "--adapter-path", adapters, "--no-reuse", ok=False)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert (f"--adapter-path {adapters}: 4 adapter tensor(s) do not fit this model (first: "
            "model.layers.0.self_attn.k_proj.lora_a: shape (32, 4), the model's (64, 4))") in result.output


@pytest.mark.parametrize("change, expected", [
    ({"lora_parameters": {"rank": "four", "scale": 10.0, "dropout": 0.0}}, "lora_parameters.rank is 'four', not a positive integer"),
    ({"lora_parameters": {"rank": 4, "scale": "10", "dropout": 0.0}}, "lora_parameters.scale is '10', not a number"),
    ({"lora_parameters": {"rank": 4, "scale": 10.0}}, "lora_parameters.dropout is missing"),
    ({"lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": "self_attn.q_proj"}},
     "lora_parameters.keys is 'self_attn.q_proj', not a list of layer names"),
    ({"lora_parameters": [4, 10.0, 0.0]}, "lora_parameters is [4, 10.0, 0.0], not an object"),
    ({"num_layers": True}, "num_layers is True, not a positive integer or -1"),
    ({"fine_tune_type": ["lora"]}, "fine_tune_type ['lora'] is not lora, dora or full"),
])
def test_a_wrongly_typed_adapter_config_field_is_one_line_naming_it(tiny_model_dir, standard_data, standard_cache,
                                                                   tmp_path, change, expected):
    """In precompute and in train, before anything reads it (mlx-lm's TypeError spanned several lines;
    train died on a comparison naming neither file nor field)."""
    weights = {f"model.layers.{i}.self_attn.q_proj.lora_a": mx.zeros((64, 4)) for i in (0, 1)}
    adapters = _adapters(tmp_path / "adapters", {**LORA_CONFIG, **change}, weights)
    for args in (("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "c", "--no-reuse"),
                 ("train", "--cache", standard_cache, "--model", tiny_model_dir, "--output", tmp_path / "run",
                  "--iters", 1, "--batch-size", 2)):
        result = tiny_models.invoke_cli(*args, "--adapter-path", adapters, catch_exceptions=True)
        assert isinstance(result.exception, SystemExit), (args[0], repr(result.exception))  # not an internal error
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, (args[0], result.output)
        assert f"{adapters / 'adapter_config.json'}: {expected}" in result.output, (args[0], result.output)
