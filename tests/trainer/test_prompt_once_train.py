"""`mlx-dpo train --prompt-once`: the layout once per pair trains exactly as the plain one, against a cache
`mlx-dpo precompute` wrote in the plain layout (step 1 = ln 2), through train and eval steps, K = 2
rejected answers, LD-DPO tails and a resume; `auto` picks it for prompt-heavy data only."""

import json
import math

import pytest
import yaml

import tiny_models

run = tiny_models.invoke_cli
_CORPUS = [r["prompt"] + r["chosen"] for r in tiny_models.standard_rows()]


def heavy_rows(n: int, k: int = 1) -> list[dict]:
    """Prompts of several sentences (4x the answers or more), short answers of different lengths."""
    rows = []
    for i in range(n):
        prompt = " ".join(_CORPUS[(i + j) % len(_CORPUS)] for j in range(3 + i % 3))
        rejected = [" no.", " maybe not."][:k] if k > 1 else " no, never" + "." * (i % 3)
        rows.append({"prompt": prompt + "\nAnswer:", "chosen": " yes" + "!" * (i % 4), "rejected": rejected})
    return rows


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """A prompt-heavy K = 1 cache and a K = 2 one, precomputed in the plain layout."""
    root = tmp_path_factory.mktemp("prompt_once")
    for name, k in (("heavy", 1), ("heavy2", 2)):
        data = root / f"{name}-data"
        data.mkdir()
        rows = heavy_rows(10, k)
        tiny_models.write_jsonl(data / "train.jsonl", rows[:8])
        tiny_models.write_jsonl(data / "valid.jsonl", rows[8:])
        result = run("precompute", "--model", tiny_model_dir, "--data", data, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def train(root, model, out, *extra, cache="heavy"):
    cache = cache if str(cache).startswith("/") else root / cache
    result = run("train", "--cache", cache, "--model", model, "--output", root / out, "--iters", 3,
                 "--batch-size", 4, "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-eval", 3,
                 "--steps-per-save", 1, "--overwrite", *extra)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in open(root / out / "metrics.jsonl")], result.output


def same_records(a: list[dict], b: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b):
        for name in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected", "nll_loss", "ntoks"):
            assert x[name] == pytest.approx(y[name], rel=1e-5, abs=1e-6), (x["step"], x["split"], name)


@pytest.mark.parametrize("cache,extra", [("heavy", ()), ("heavy", ("--ld-alpha", "0.5")), ("heavy2", ())],
                         ids=["k1", "ld-alpha", "k2"])
def test_on_trains_as_off(root, tiny_model_dir, cache, extra):
    on, said = train(root, tiny_model_dir, f"on-{cache}-{len(extra)}", "--prompt-once", "on", *extra, cache=cache)
    off, said_off = train(root, tiny_model_dir, f"off-{cache}-{len(extra)}", "--prompt-once", "off", *extra, cache=cache)
    assert "Prompt once per pair: on (--prompt-once on)" in said
    assert "Prompt once per pair: off (--prompt-once off)" in said_off
    first = next(r for r in on if r["split"] == "train")
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert on[0]["split"] == "eval" and on[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    same_records(on, off)
    assert {r["prompt_once"] for r in on if r["split"] == "train"} == {True}
    assert {r["prompt_once"] for r in off if r["split"] == "train"} == {False}
    assert all(1 <= r["compiled_shapes"] <= 3 for r in on if r["split"] == "train")


def test_auto_picks_on_for_prompt_heavy_data_off_for_the_demo_data(root, tiny_model_dir, standard_cache):
    heavy, said = train(root, tiny_model_dir, "auto-heavy")
    assert "Prompt once per pair: on (auto: the first batches hold" in said and "(10% needed)" in said
    assert heavy[1]["prompt_once"] is True
    demo, said = train(root, tiny_model_dir, "auto-demo", cache=standard_cache)
    assert "Prompt once per pair: off (auto: the first batches hold" in said
    assert demo[1]["prompt_once"] is False
    from mlx_dpo.models import load_model

    block = type(load_model(tiny_model_dir).layers[0])
    call = block.__call__
    try:
        _, said = train(root, tiny_model_dir, "auto-ckpt", "--grad-checkpoint")
    finally:  # mlx-lm's grad_checkpoint patches the block class for the whole process
        block.__call__ = call
    assert "Prompt once per pair: off (auto: not with --grad-checkpoint)" in said


def test_blocks_checkpointed_by_an_earlier_run_are_refused(root, tiny_model_dir):
    """mlx-lm's grad_checkpoint stays on the block class after a run: a later run in the process that
    would share the prompt must not train with wrong gradients."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    from mlx_dpo.models import load_model

    block = load_model(tiny_model_dir).layers[0]
    call = type(block).__call__
    try:
        grad_checkpoint(block)
        _, said = train(root, tiny_model_dir, "after-ckpt")
        assert "Prompt once per pair: off (auto: not with --grad-checkpoint)" in said
        result = tiny_models.run_cli("train", "--cache", root / "heavy", "--model", tiny_model_dir, "--output",
                                     root / "after-ckpt", "--overwrite", "--prompt-once", "on", ok=False)
        assert result.exit_code != 0 and "loses the prompt keys' gradient" in result.output, result.output
    finally:
        type(block).__call__ = call


def test_resume_within_and_across_layouts(root, tiny_model_dir):
    whole, _ = train(root, tiny_model_dir, "whole", "--prompt-once", "off")
    for first, then in (("on", "on"), ("off", "on"), ("on", "off")):
        out = f"resume-{first}-{then}"
        train(root, tiny_model_dir, out, "--prompt-once", first, "--stop-after", 2)
        result = run("train", "--cache", root / "heavy", "--model", tiny_model_dir, "--output", root / out, "--iters", 3,
                     "--batch-size", 4, "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-eval", 3,
                     "--steps-per-save", 1, "--resume", "--prompt-once", then)
        assert result.exit_code == 0, result.output
        same_records([json.loads(line) for line in open(root / out / "metrics.jsonl")], whole)


def test_config_file_round_trip(root, tiny_model_dir, tmp_path):
    from mlx_dpo.cli import build_config
    from mlx_dpo.trainer.config import TrainConfig

    for written, value in (("on", "on"), ("off", "off"), ("auto", "auto"), ("'on'", "on")):
        path = tmp_path / "c.yaml"
        path.write_text(f"cache: x\nmodel: y\noutput: z\nprompt_once: {written}\n")  # YAML 1.1: bare on/off are booleans
        cfg = build_config(TrainConfig, {}, str(path))
        assert cfg.prompt_once == value
        saved = tmp_path / "saved.yaml"
        saved.write_text(yaml.safe_dump({"cache": "x", "model": "y", "output": "z", "prompt_once": cfg.prompt_once}))
        assert build_config(TrainConfig, {}, str(saved)).prompt_once == value
    (root / "from-config.yaml").write_text("prompt_once: on\n")
    _, said = train(root, tiny_model_dir, "from-config", "--config", root / "from-config.yaml")
    assert "Prompt once per pair: on (--prompt-once on)" in said
    assert yaml.safe_load((root / "from-config" / "config.yaml").read_text())["prompt_once"] == "on"


def test_on_refused_where_it_cannot_be(root, tiny_model_dir, monkeypatch):
    """One line, no traceback, non-zero: with --grad-checkpoint, and for an architecture not checked."""
    for extra in (("--prompt-once", "on", "--grad-checkpoint"), ("--prompt-once", "sideways")):
        result = tiny_models.run_cli("train", "--cache", root / "heavy", "--model", tiny_model_dir, "--output",
                                     root / "refused", *extra, ok=False)
        assert result.exit_code != 0 and "Traceback" not in result.output and result.output.count("\n") == 1, result.output
    import mlx_dpo.trainer.run as run_module

    monkeypatch.setattr(run_module, "can_share_prompt", lambda model: False)  # as for a model of another architecture
    result = tiny_models.run_cli("train", "--cache", root / "heavy", "--model", tiny_model_dir, "--output",
                                 root / "refused", "--prompt-once", "on", ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: --prompt-once on: ") and "cannot share its prompt" in result.output
    _, said = train(root, tiny_model_dir, "auto-other")
    assert "Prompt once per pair: off (auto: not for mlx_lm.models.llama models" in said


@pytest.mark.slow
def test_two_ranks_with_prompt_once_train_what_one_process_trains(root, tiny_model_dir):
    """mlx.launch, 2 ranks x 2 pairs, each rank deciding `auto` alone (over the global batches: the same
    answer), against 1 process x 4 pairs in the plain layout."""
    import subprocess
    import sys
    from pathlib import Path

    off, _ = train(root, tiny_model_dir, "one-rank-off", "--prompt-once", "off")
    command = [*tiny_models.ring_launch(2), str(Path(sys.executable).parent / "mlx-dpo"), "train", "--cache",
               root / "heavy", "--model", tiny_model_dir, "--output", root / "two-ranks", "--iters", 3, "--batch-size", 2,
               "--learning-rate", 1e-2, "--steps-per-report", 1, "--steps-per-eval", 3, "--steps-per-save", 1]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Prompt once per pair: on (auto:" in output, output
    two = [json.loads(line) for line in open(root / "two-ranks" / "metrics.jsonl")]
    assert {r["prompt_once"] for r in two if r["split"] == "train"} == {True}
    same_records(two, off)
