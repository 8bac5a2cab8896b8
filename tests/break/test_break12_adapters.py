"""Break tests for issue #12's adapters as the starting point (item 8)."""

import json

import mlx.core as mx

from tiny_models import invoke_cli


def test_the_starting_point_note_reads_as_the_readme_says(tiny_model_dir, standard_cache, tmp_path):
    """Stated (README, 'Starting points'): when the policy's starting point is not the cache's reference,
    train says so in one line: `Note: the policy does not start from the cache's reference (adapters:
    cache none, policy 3f2a…); step 1 will not be ln 2 ...`. Happens: the line train prints is another
    one, `Note: policy MODEL: its adapters (9c1d…) are not the cache's reference's (none; to start from
    adapters, precompute with the same --adapter-path); so step 1's loss is not exactly ln 2 nor its
    margins 0`: a user (or script) looking for the documented line does not find it."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}))
    mx.save_safetensors(str(adapters / "adapters.safetensors"),
                        {f"model.layers.{i}.self_attn.q_proj.lora_b": mx.full((4, 64), 0.01) for i in (0, 1)})
    result = invoke_cli("train", "--cache", standard_cache, "--model", tiny_model_dir, "--adapter-path", adapters,
                        "--output", tmp_path / "run", "--iters", 1, "--batch-size", 2, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("Note:")]
    assert len(notes) == 1, result.output
    assert notes[0].startswith("Note: the policy does not start from the cache's reference (adapters: cache none, "
                               "policy "), notes[0]
