"""Our first training loss equals TRL 1.16's DPOTrainer loss (torch, CPU, float32) on the same tiny models
and data, for every loss type, f-divergence, LD-DPO and RPO setting the two share. TRL's own code is the
oracle: its `compute_loss` on one batch of every pair, with a policy different from the reference.

Our side: `precompute` with the reference, then `train --iters 1` with the policy and a batch that holds
every pair; the step-1 record is the loss before any update (LoRA starts as the identity).

Large log-ratios: a copy of the cache whose reference log-probs are moved by tens of nats (log-ratios
of about ±40 to ±100, as sums over long completions reach), fed to TRL as precomputed reference values;
where TRL's loss is finite ours equals it, where it is not ours is still finite."""

import hashlib
import json
import math
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import tiny_models
from mlx_dpo.cli import cli

# (case id, TRL settings, our flags)
CASES = [(t, {"loss_type": [t]}, ["--loss-type", t]) for t in (
    "sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
    "apo_down", "discopop", "sigmoid_norm", "sft")] + [
    ("robust-0.2", {"loss_type": ["robust"], "label_smoothing": 0.2}, ["--loss-type", "robust", "--label-smoothing", 0.2]),
    ("exo_pair-0.1", {"loss_type": ["exo_pair"], "label_smoothing": 0.1},
     ["--loss-type", "exo_pair", "--label-smoothing", 0.1]),
    ("aot-0.1", {"loss_type": ["aot"], "label_smoothing": 0.1}, ["--loss-type", "aot", "--label-smoothing", 0.1]),
    ("sigmoid-forward_kl", {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
     ["--f-divergence-type", "forward_kl"]),
    ("sigmoid-js", {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
     ["--f-divergence-type", "js_divergence"]),
    ("sigmoid-alpha", {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence"},
     ["--f-divergence-type", "alpha_divergence"]),  # both default α to 0.5
    ("ipo-alpha-0.3", {"loss_type": ["ipo"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
     ["--loss-type", "ipo", "--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", 0.3]),
    ("hinge-forward_kl", {"loss_type": ["hinge"], "f_divergence_type": "forward_kl"},
     ["--loss-type", "hinge", "--f-divergence-type", "forward_kl"]),
    ("discopop-tau", {"loss_type": ["discopop"], "discopop_tau": 0.3}, ["--loss-type", "discopop", "--discopop-tau", 0.3]),
    ("ld_alpha-0.3", {"loss_type": ["sigmoid"], "ld_alpha": 0.3}, ["--ld-alpha", 0.3]),
    ("ld_alpha-sft", {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5, "loss_weights": [1.0, 0.7]},
     ["--ld-alpha", 0.5, "--rpo-alpha", 0.7]),
    ("rpo_alpha", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, ["--rpo-alpha", 0.5]),
    ("weighted", {"loss_type": ["ipo", "bco_pair"], "loss_weights": [0.3, 2.0]},
     ["--loss-type", "ipo,bco_pair", "--loss-weights", "0.3,2"]),
    ("beta-0.5", {"loss_type": ["sigmoid"], "beta": 0.5}, ["--beta", 0.5]),
    ("sigmoid-alpha-2", {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 2.0},
     ["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", 2]),
]
# (chosen, rejected) nats added to the cached reference, cycled over the rows: log-ratios of about
# (-40, -45), (+100, +40), (-45, -40), (+40, +100).
SHIFTS = [(40.0, 45.0), (-100.0, -40.0), (45.0, 40.0), (-40.0, -100.0)]
# The large-ratio cases run by default (each divergence and each loss with an exponential); the rest: -m slow.
FAST_LARGE = {"sigmoid", "hinge", "ipo", "exo_pair-0.1", "robust-0.2", "discopop", "sigmoid_norm", "sigmoid-forward_kl",
              "sigmoid-js", "sigmoid-alpha", "ipo-alpha-0.3", "hinge-forward_kl", "sigmoid-alpha-2"}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The reference (the shared tiny model), a policy = reference + noise (log-ratios of a few nats),
    the 12 standard rows, our cache, and TRL's losses for every case."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trl-loss")
    policy_dir = root / "policy"
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.3 * parameter.std() * torch.randn(parameter.shape, generator=generator))
    policy.save_pretrained(str(policy_dir))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(policy_dir))
    rows = tiny_models.standard_rows()
    tiny_models.write_jsonl(root / "data.jsonl", rows)
    result = CliRunner().invoke(cli, ["precompute", "--model", str(tiny_model_dir), "--data", str(root / "data.jsonl"),
                                      "--out", str(root / "cache")])
    assert result.exit_code == 0, result.output
    trl = trl_losses(tiny_model_dir, policy_dir, rows, root / "trl")
    # The comparison can fail: the policy is not the reference (sigmoid is not ln 2) and the cases differ.
    assert abs(trl["sigmoid"] - 0.693147) > 0.01 and len({round(v, 4) for v in trl.values()}) == len(trl)
    return root, policy_dir, trl


@pytest.fixture(scope="module")
def shifted(setup):
    """The cache with its reference moved by SHIFTS, and TRL's losses with those reference values."""
    import shutil

    root, policy_dir, _ = setup
    shutil.copytree(root / "cache", root / "shifted")
    refs = shift_reference(root / "shifted", SHIFTS)
    trl = trl_losses(policy_dir, policy_dir, tiny_models.standard_rows(), root / "trl-shifted", refs)
    return root / "shifted", policy_dir, trl


def shift_reference(cache, shifts) -> dict[int, tuple[float, float]]:
    """Add shifts[index % len(shifts)] nats to each row's cached reference (manifest sizes and sums kept
    right); returns {index: (ref_chosen, ref_rejected)} as now cached."""
    manifest = json.loads((cache / "manifest.json").read_text())
    values = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = cache / shard["path"]
            table = pq.read_table(path)
            index = table["index"].to_numpy()
            for name, side in (("ref_chosen_logps", 0), ("ref_rejected_logps", 1)):
                column = table.schema.get_field_index(name)
                moved = table.column(column).to_numpy() + np.array([shifts[i % len(shifts)][side] for i in index])
                table = table.set_column(column, table.schema.field(column), [moved.astype(np.float32)])
            pq.write_table(table, path)
            shard["bytes"], shard["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
            for row in table.select(["index", "ref_chosen_logps", "ref_rejected_logps"]).to_pylist():
                values[row["index"]] = (row["ref_chosen_logps"], row["ref_rejected_logps"])
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return values


def trl_losses(reference_dir, policy_dir, rows, output_dir, refs=None) -> dict[str, float]:
    """TRL's DPOTrainer.compute_loss on one batch of all rows, for every case (TRL builds its trainer once;
    each case sets the attributes its __init__ sets from DPOConfig)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        return _trl_losses(reference_dir, policy_dir, rows, output_dir, refs)
    finally:
        torch.set_num_threads(threads)


def _trl_losses(reference_dir, policy_dir, rows, output_dir, refs=None) -> dict[str, float]:
    """refs: {index: (ref_chosen, ref_rejected)} given to TRL as precomputed reference log-probs."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    load = lambda path: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=str(output_dir), per_device_train_batch_size=len(rows), max_length=None,
                         report_to=[], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
                         dataloader_num_workers=0, save_strategy="no", label_smoothing=0.1)
        trainer = DPOTrainer(model=load(policy_dir), ref_model=load(reference_dir), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(str(policy_dir)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert len(trainer.train_dataset) == len(rows)
    if refs is not None:  # TRL's precomputed-reference path
        batch["ref_chosen_logps"] = torch.tensor([refs[i][0] for i in range(len(rows))])
        batch["ref_rejected_logps"] = torch.tensor([refs[i][1] for i in range(len(rows))])
        trainer.precompute_ref_logps = True
    for model in (trainer.model, trainer.ref_model):  # every case scores the same batch: forward once
        model.forward = _once(model.forward)
    out = {}
    for case, settings, _ in CASES:
        settings = {"beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "ld_alpha": None,
                    "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, **settings}
        trainer.loss_types = settings["loss_type"]
        trainer.loss_weights = settings.get("loss_weights", [1.0] * len(trainer.loss_types))
        for name in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "ld_alpha"):
            setattr(trainer, name, settings[name])
        trainer.args.discopop_tau = settings["discopop_tau"]
        trainer.model.train()
        with torch.no_grad():
            out[case] = trainer.compute_loss(trainer.model, batch).item()
    return out


def _once(forward):
    outputs = []

    def forward_once(*args, **kwargs):
        if not outputs:
            outputs.append(forward(*args, **kwargs))
        return outputs[0]

    return forward_once


@pytest.mark.parametrize("case, flags", [(c, f) for c, _, f in CASES], ids=[c for c, _, _ in CASES])
def test_first_loss_equals_trl(setup, case, flags, tmp_path):
    root, policy_dir, trl = setup
    result = CliRunner().invoke(cli, [str(a) for a in [
        "train", "--cache", root / "cache", "--model", policy_dir, "--output", tmp_path / "run", "--iters", 1,
        "--batch-size", 16, *flags]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(trl[case], rel=1e-4), (case, first["loss"], trl[case])


def _first_loss(cache, policy_dir, flags, output) -> float:
    result = CliRunner().invoke(cli, [str(a) for a in [
        "train", "--cache", cache, "--model", policy_dir, "--output", output, "--iters", 1, "--batch-size", 16,
        *flags]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(open(output / "metrics.jsonl").readline())["loss"]


@pytest.mark.parametrize("case, flags", [
    pytest.param(c, f, marks=() if c in FAST_LARGE else pytest.mark.slow, id=c) for c, _, f in CASES
    if not c.startswith("ld_alpha")])  # TRL's precomputed reference is LD-weighted: not our shifted columns
def test_large_log_ratios_equal_trl(shifted, case, flags, tmp_path):
    """Log-ratios of ±40 to ±100 nats: equal to TRL where its loss is finite (a cap at 30 nats made
    forward_kl ln 2 here, TRL ~0), finite where TRL's is not (ipo's square of e^45)."""
    cache, policy_dir, trl = shifted
    ours = _first_loss(cache, policy_dir, flags, tmp_path / "run")
    if math.isfinite(trl[case]):
        assert ours == pytest.approx(trl[case], rel=1e-4, abs=1e-4), (case, ours, trl[case])
    else:
        assert math.isfinite(ours), (case, ours, trl[case])
