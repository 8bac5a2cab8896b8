"""TrainConfig refuses options that change nothing, as TRL 1.16's DPOTrainer refuses them, and keeps
TRL's defaults."""

import pytest

from mlx_dpo.errors import UserError
from mlx_dpo.trainer.config import F_DIVERGENCE_LOSSES, LOSS_TYPES, TrainConfig

PATHS = dict(cache="c", model="m", output="o")
IGNORES_F_DIVERGENCE = ["nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "simpo"]


def test_f_divergence_sets_match_trl():
    """TRL 1.16 lists the losses an f-divergence applies to inside DPOTrainer.__init__; read it from its source."""
    import inspect
    import re

    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer.__init__)
    trl_set = set(re.search(r"f_divergence_loss_types = \{([^}]*)\}", source).group(1).replace('"', "").split(", "))
    assert trl_set == set(F_DIVERGENCE_LOSSES)
    assert set(IGNORES_F_DIVERGENCE) == set(LOSS_TYPES) - trl_set


@pytest.mark.parametrize("loss", IGNORES_F_DIVERGENCE)
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_with_a_loss_that_ignores_it_is_refused(loss, divergence):
    with pytest.raises(UserError, match=f"--f-divergence-type {divergence} has no effect on --loss-type {loss}"):
        TrainConfig(**PATHS, loss_type=loss, f_divergence_type=divergence)


@pytest.mark.parametrize("loss", sorted(F_DIVERGENCE_LOSSES))
def test_f_divergence_with_a_loss_that_uses_it_is_accepted(loss):
    eps = 1e-3 if loss == "exo_pair" else 0.0
    TrainConfig(**PATHS, loss_type=loss, f_divergence_type="forward_kl", label_smoothing=eps)
    TrainConfig(**PATHS, loss_type="sigmoid", rpo_alpha=0.5, f_divergence_type="js_divergence")  # + sft


def test_label_smoothing_refused_where_it_changes_nothing():
    with pytest.raises(UserError, match="--label-smoothing has no effect with --rejected-aggregation softmax"):
        TrainConfig(**PATHS, label_smoothing=0.1, rejected_aggregation="softmax")
    with pytest.raises(UserError, match="--label-smoothing has no effect on --loss-type hinge"):
        TrainConfig(**PATHS, loss_type="hinge", label_smoothing=0.1)
    TrainConfig(**PATHS, loss_type="hinge,robust", label_smoothing=0.1)


def test_exo_pair_needs_label_smoothing():
    """TRL 1.16 refuses exo_pair with label_smoothing 0 (its log ε is -inf); we once used 1e-3 silently."""
    from mlx_dpo import preference_loss

    with pytest.raises(UserError, match="--loss-type exo_pair needs --label-smoothing > 0"):
        TrainConfig(**PATHS, loss_type="exo_pair")
    with pytest.raises(UserError, match="--loss-type exo_pair needs --label-smoothing > 0"):
        TrainConfig(**PATHS, loss_type="sigmoid,exo_pair")
    TrainConfig(**PATHS, loss_type="exo_pair", label_smoothing=1e-3)
    with pytest.raises(ValueError, match="exo_pair needs label_smoothing > 0"):
        preference_loss([-1.0], [-2.0], [-1.0], [-1.0], loss_type="exo_pair")


def test_trl_defaults():
    cfg = TrainConfig(**PATHS)
    from trl import DPOConfig

    assert DPOConfig.__dataclass_fields__["f_alpha_divergence_coef"].default == cfg.f_alpha_divergence_coef


def test_batch_level_losses_refuse_accumulation():
    with pytest.raises(UserError, match="sorts across the batch"):
        TrainConfig(**PATHS, loss_type="aot", grad_accumulation_steps=2)
