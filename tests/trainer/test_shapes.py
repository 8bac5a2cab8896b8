"""Shape ladders (mlx_dpo.shapes): a few distinct shapes for the compiled step, and only padding changes:
the demo trains to the same losses as with the rounding before the ladders (x32 widths, x64 scored
positions, short batches as they came)."""

import math
from pathlib import Path

import pytest

import tiny_models
from mlx_dpo.shapes import ladder, ladder_ceil

BEFORE_LADDERS = dict(pad_to_multiple=32, pad_ratio=1.0, score_multiple=64, score_ratio=1.0, fixed_rows=False)


def test_ladder_rungs():
    assert [ladder_ceil(n, 32, 1.25) for n in (1, 32, 33, 97, 129, 161, 225, 289)] == [32, 32, 64, 128, 160, 224, 288, 384]
    assert [ladder_ceil(n, 8) for n in (0, 1, 8, 9)] == [8, 8, 8, 16]  # ratio 1: round up to a multiple
    assert ladder(100, 300, 16, 1.0625) == [112, 128, 144, 160, 176, 192, 208, 224, 240, 256, 272, 304]
    # Geometric: ~1 + log(range) / log(ratio) rungs, not range / multiple.
    assert len(ladder(64, 8192, 16, 1.0625)) < 75 < len(range(64, 8192, 16)) / 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's model and its first 96 training pairs, precomputed as `make train` does (--max-length 256)."""
    from mlx_dpo.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    model, data = build_demo(root / "demo")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join((data / "train.jsonl").read_text().splitlines(True)[:96]))
    result = tiny_models.invoke_cli("precompute", "--model", model, "--data", root / "data", "--out", root / "cache",
                                    "--max-length", 256)
    assert result.exit_code == 0, result.output
    return model, root / "cache"


def _train(model: Path, cache: Path, out: Path, steps: int, **stream_options) -> tuple[list[dict], list[tuple]]:
    """`steps` LoRA steps of batch 8 (the demo's), as `mlx-dpo train` runs them but for the stream's
    shape options; returns the reports and the shapes of the batches."""
    import mlx.core as mx

    from mlx_dpo.models import load_model, load_tokenizer
    from mlx_dpo.trainer.config import TrainConfig
    from mlx_dpo.trainer.policy import prepare_policy
    from mlx_dpo.trainer.run import build_optimizer, open_cache
    from mlx_dpo.trainer.stream import PairStream
    from mlx_dpo.trainer.train import make_loss_fn, train

    cfg = TrainConfig(cache=str(cache), model=str(model), output=str(out), iters=steps, batch_size=8, learning_rate=1e-3)
    manifest = open_cache(str(cache))
    mx.random.seed(cfg.seed)
    policy = load_model(model)
    prepare_policy(policy, cfg)
    stream = PairStream([cache / s.path for s in manifest.splits["train"].shards], batch_size=8,
                        max_length=manifest.max_length, truncation_mode=manifest.truncation_mode, pad_id=load_tokenizer(model).pad_token_id,
                        seed=cfg.seed,
                        **stream_options)
    shapes, reports = [], []

    def batches():
        for _, step in stream.forever():
            shapes.append((step[0].input_ids.shape, step[0].plan.shape))
            yield step

    train(policy, build_optimizer(cfg), batches(), make_loss_fn(cfg.loss_options()), iters=steps, steps_per_report=1,
          steps_per_eval=10**9, steps_per_save=10**9, on_report=lambda step, m: reports.append(m))
    return reports, shapes[:steps]


def test_demo_losses_as_before_the_ladders(demo, tmp_path):
    """Step 1 is ln 2. Where the shapes are those of the rounding before the ladders (the demo's short
    rows: every batch here), every metric is the same, exactly. Padded otherwise (none, or far more),
    step 1 is the same within 1e-6 and the next steps (weights moved by updates from differently padded
    batches) within 1e-5."""
    model, cache = demo
    now, now_shapes = _train(model, cache, tmp_path / "now", 3, fixed_rows=True)
    before, before_shapes = _train(model, cache, tmp_path / "before", 3, **BEFORE_LADDERS)
    assert now_shapes == before_shapes
    timing = ("tokens_per_sec", "peak_memory_gb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in now] == \
        [{k: v for k, v in r.items() if k not in timing} for r in before]
    assert now[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert [r["compiled_shapes"] for r in now] == [len(set(now_shapes[: i + 1])) for i in range(3)]
    for name, options in (("unpadded", dict(pad_to_multiple=1, score_multiple=1, score_ratio=1.0)),
                          ("padded", dict(pad_to_multiple=96, score_multiple=1024))):
        other, other_shapes = _train(model, cache, tmp_path / name, 3, fixed_rows=True, **options)
        assert all(a != b for a, b in zip(other_shapes, now_shapes)), (other_shapes, now_shapes)
        assert other[0]["loss"] == pytest.approx(now[0]["loss"], abs=1e-6)
        for a, b in zip(now, other):
            for metric in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
                assert b[metric] == pytest.approx(a[metric], rel=1e-5, abs=1e-5), (name, metric, a, b)
            assert b["ntoks"] == a["ntoks"]
