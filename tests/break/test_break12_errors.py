"""Break tests for issue #12: bad input gives one clear line naming file, row and field, a
non-zero exit and no traceback (the project's bar, and the issue's items 3, 7 and 8)."""

import json

import mlx.core as mx

import tiny_models
from tiny_models import invoke_cli


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def test_split_files_with_other_columns_is_one_line(tiny_model_dir, tmp_path):
    """Stated: a folder of split files (train.jsonl + valid.jsonl) is read, a column named by an option
    must exist in every split, and bad input is one line naming the file. Happens: when valid.jsonl
    has a `prompt` column and train.jsonl does not (implicit prompts), `datasets` refuses the folder
    and precompute prints a 7-line error naming neither file:
    `Error: DIR: could not read the data (CastError: Couldn't cast` / `prompt: string` / ... /
    `because column names don't match)`."""
    data = tmp_path / "data"
    data.mkdir()
    tiny_models.write_jsonl(data / "train.jsonl", [{"chosen": "The answer is four.", "rejected": "The answer is five."}])
    tiny_models.write_jsonl(data / "valid.jsonl", [{"prompt": "2+2? The answer is", "chosen": " four.", "rejected": " five."}])
    result = invoke_cli("precompute", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "c")
    assert result.exit_code != 0
    lines = _error_lines(result)
    assert len(lines) == 1, result.output
    assert "valid.jsonl" in lines[0] or "train.jsonl" in lines[0], result.output


def test_adapters_of_another_model_is_one_line(tiny_model_dir, standard_data, tmp_path):
    """Stated (item 8 and the bar): --adapter-path adapters that do not fit give one clear line, non-zero
    exit. Happens: mlx-lm's multi-line ValueError is passed through, one line per mismatched tensor:
    `Error: --adapter-path ADAPTERS: cannot apply to this model (ValueError: Adapter at ... contains
    incompatible tensors:` / `  model.layers.0.self_attn.q_proj.lora_a: adapter shape (32, 4) does not
    match model parameter shape (64, 4)` / ... (one line per tensor: 29 lines for a whole 2-layer model)."""
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0}}))
    weights = {}
    for layer in (0, 1):
        for proj in ("q_proj", "k_proj"):  # a model of hidden size 32, not the tiny model's 64
            weights[f"model.layers.{layer}.self_attn.{proj}.lora_a"] = mx.zeros((32, 4))
    mx.save_safetensors(str(adapters / "adapters.safetensors"), weights)
    result = invoke_cli("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "c",
                        "--adapter-path", adapters, "--no-reuse")
    assert result.exit_code != 0
    lines = _error_lines(result)
    assert len(lines) == 1 and "--adapter-path" in lines[0], result.output


def _adapters_with_rank(directory, rank):
    """A LoRA adapter directory for the tiny model (2 layers, q/k lora_a of rank 4) whose config says `rank`."""
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": rank, "scale": 10.0, "dropout": 0.0}}))
    weights = {f"model.layers.{i}.self_attn.q_proj.lora_a": mx.zeros((64, 4)) for i in (0, 1)}
    mx.save_safetensors(str(directory / "adapters.safetensors"), weights)
    return directory


def test_adapter_config_with_a_text_rank_is_one_line(tiny_model_dir, standard_data, standard_cache, tmp_path):
    """Stated (item 8, README: the LoRA options come from adapter_config.json; the bar: bad input is one
    line naming the file and field, no traceback). Happens with `"lora_parameters": {"rank": "four", ...}`:
    precompute prints mlx-lm's multi-line TypeError (`Error: --adapter-path A: cannot apply to this model
    (TypeError: uniform(): incompatible function arguments. The following argument types are supported:`
    / ... / `Invoked with types: kwargs = { low: float, high: float, shape: tuple })`), and train dies
    with an internal error naming neither file nor field:
    `Error: TypeError: '>=' not supported between instances of 'str' and 'int' (run with --debug for the
    traceback)`."""
    adapters = _adapters_with_rank(tmp_path / "adapters", "four")
    outputs = []
    for args in (("precompute", "--model", tiny_model_dir, "--data", standard_data, "--out", tmp_path / "c",
                  "--no-reuse"),
                 ("train", "--cache", standard_cache, "--model", tiny_model_dir, "--output", tmp_path / "run",
                  "--iters", 1, "--batch-size", 2)):
        result = invoke_cli(*args, "--adapter-path", adapters, catch_exceptions=True)
        said = result.output + ("" if result.exception is None or isinstance(result.exception, SystemExit)
                                else f"<internal {type(result.exception).__name__}: {result.exception}>")
        outputs.append((args[0], result.exit_code, said))
    for _command, code, said in outputs:
        lines = [line for line in said.splitlines() if line.strip() and not line.startswith("Note:")]
        assert code != 0 and len(lines) == 1 and "adapter_config.json" in lines[0] and "rank" in lines[0], outputs
