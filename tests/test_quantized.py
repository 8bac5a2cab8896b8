"""Quantized mlx-lm checkpoints (what most Mac users download): the reference is dequantized to
float32 on CPU (same weight values, recorded in the manifest), train does QLoRA on the frozen base."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pyarrow.parquet as pq
import pytest

from mlx_dpo.logps import sequence_logps
from mlx_dpo.models import load_model
from mlx_dpo.schemas.sequence import truncate_sequence
from tiny_models import run_cli


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model through mlx_lm's own converter: 4-bit, groups of 32, bfloat16 scales (as the hub's)."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q4") / "model"
    convert(str(tiny_model_dir), str(out), quantize=True, q_bits=4, q_group_size=32, dtype="bfloat16")
    return out


@pytest.fixture(scope="module")
def quantized_cache(quantized_dir, standard_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4-cache") / "cache"
    run_cli("precompute", "--model", quantized_dir, "--data", standard_data, "--out", out, "--max-length", 22)
    return out


def _unpacked(layer) -> np.ndarray:
    """A 4-bit affine-quantized weight as float64, by hand: q * scale + bias per group of 32."""
    packed = np.array(layer.weight).view(np.uint8)  # two 4-bit values a byte, low nibble first
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float64)
    scales = np.array(layer.scales.astype(mx.float32)).astype(np.float64).repeat(32, axis=1)
    biases = np.array(layer.biases.astype(mx.float32)).astype(np.float64).repeat(32, axis=1)
    return q * scales + biases


def test_reference_forward_is_float32_of_the_same_weight_values(quantized_dir, quantized_cache):
    quantized = load_model(quantized_dir)
    dequantized = load_model(quantized_dir, dequantize=True)
    q_proj = quantized.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear)
    weight = dequantized.layers[0].self_attn.q_proj.weight
    assert weight.dtype == mx.float32
    assert np.array_equal(np.array(weight).astype(np.float64), _unpacked(q_proj))  # exact: no rounding
    fields = json.loads((quantized_cache / "manifest.json").read_text())["identity_fields"]
    assert fields["reference_dequantized"] == {"group_size": 32, "bits": 4, "mode": "affine", "to": "float32"}
    # The cache holds what the quantized model computes (to float32 rounding).
    row = pq.read_table(sorted(quantized_cache.glob("train/part-*.parquet"))[0]).to_pylist()[0]
    ids, mask = truncate_sequence(row["prompt_ids"], row["chosen_ids"], 22)
    ids, mask = mx.array([ids]), mx.array([mask])
    assert sequence_logps(quantized, ids, mask)[0].item() == pytest.approx(row["ref_chosen_logps"], abs=1e-4)


def test_train_does_qlora_and_its_adapters_load_with_mlx_lm(quantized_dir, quantized_cache, tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "--cache", quantized_cache, "--model", quantized_dir, "--output", run, "--iters", 4,
                  "--batch-size", 2, "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-save", 4)
    assert "Note: policy" not in result.output
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)

    import mlx_lm
    from mlx_lm.tuner.lora import LoRALinear

    model, _ = mlx_lm.load(str(quantized_dir), adapter_path=str(run))
    q_proj = model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.linear, nn.QuantizedLinear)  # LoRA on the 4-bit base
    assert float(mx.abs(q_proj.lora_b).max()) > 0  # trained


def test_full_fine_tuning_of_a_quantized_model_is_refused(quantized_dir, quantized_cache, tmp_path):
    result = run_cli("train", "--cache", quantized_cache, "--model", quantized_dir, "--output", tmp_path / "run",
                     "--fine-tune-type", "full", ok=False)
    assert result.exit_code != 0 and "quantized" in result.output and "Traceback" not in result.output
