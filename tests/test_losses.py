"""Every loss against a value worked out by hand.

Shared example unless stated: policy chosen/rejected -2/-3, reference -2.5/-2.5, β = 0.5,
completion lengths 2/4. So chosen log-ratio c = +0.5, rejected r = -0.5, x = c - r = 1, βx = 0.5.
Useful values: logσ(0.5) = -0.474077, logσ(-0.5) = -0.974077, σ(0.5) = 0.622459.
"""

import math

import mlx.core as mx
import pytest

from mlx_dpo import preference_loss
from mlx_dpo.losses import LOSSES


def loss(loss_type="sigmoid", beta=0.5, **options):
    out = preference_loss(mx.array([-2.0]), mx.array([-3.0]), mx.array([-2.5]), mx.array([-2.5]),
                          loss_type=loss_type, beta=beta, chosen_lengths=mx.array([2]),
                          rejected_lengths=mx.array([4]), **options)
    assert out.shape == (1,)
    return out.item()


HAND_WORKED = {
    # name: (value, options, arithmetic)
    "sigmoid": (0.474077, {}, "-logσ(0.5)"),
    "hinge": (0.5, {}, "relu(1 - 0.5)"),
    "ipo": (0.390625, {}, "(c/2 - r/4 - 1/(2β))² = (0.25 + 0.125 - 1)²"),
    "exo_pair": (0.272055, {"label_smoothing": 0.1},
                 "σ(.5)(logσ(.5) - ln .9) + σ(-.5)(logσ(-.5) - ln .1) = .622459·(-.368716) + .377541·1.328508"),
    "nca_pair": (1.276879, {}, "-logσ(.25) - ½logσ(-.25) - ½logσ(.25)"),
    "robust": (0.411577, {"label_smoothing": 0.1}, "(0.9·0.474077 - 0.1·0.974077) / 0.8"),
    "bco_pair": (1.151879, {}, "-logσ(βc) - logσ(-βr) = 2·(-logσ(0.25))"),
    "sppo_hard": (0.5, {}, "(0.5 - 1)² + (-0.5 + 1)²"),
    "apo_zero": (0.875647, {}, "1 - σ(0.25) + σ(-0.25)"),
    "apo_down": (0.939717, {}, "σ(0.25) + 1 - σ(0.5)"),
    "discopop": (0.606525, {}, "gate σ(0.5/0.05) = 0.999955: 0.474077·0.000045 + e^-0.5·0.999955"),
    "sigmoid_norm": (0.603785, {}, "-logσ(β(c/2 - r/4)) = -logσ(0.1875)"),
    "simpo": (1.053701, {"simpo_gamma": 0.5}, "-logσ(β(-2/2 + 3/4) - 0.5) = -logσ(-0.625)"),
    "sft": (1.0, {}, "-(-2)/2 tokens"),
}


@pytest.mark.parametrize("name", sorted(HAND_WORKED))
def test_hand_worked(name):
    value, options, _arithmetic = HAND_WORKED[name]
    options = dict(options)
    beta_kwargs = {"label_smoothing": options.pop("label_smoothing")} if "label_smoothing" in options else {}
    assert loss(name, **beta_kwargs, **options) == pytest.approx(value, abs=1e-6)


def test_every_registered_loss_has_a_hand_worked_test():
    assert set(LOSSES) - {"aot", "aot_unpaired"} == set(HAND_WORKED)


def test_conservative_dpo():
    """ε = 0.1: 0.9·0.474077 + 0.1·0.974077 = 0.524077."""
    assert loss("sigmoid", label_smoothing=0.1) == pytest.approx(0.524077, abs=1e-6)


def test_swap_flips_sigmoid():
    """Chosen and rejected swapped: -logσ(-0.5) = 0.974077."""
    out = preference_loss(mx.array([-3.0]), mx.array([-2.0]), mx.array([-2.5]), mx.array([-2.5]), beta=0.5)
    assert out.item() == pytest.approx(0.974077, abs=1e-6)


@pytest.mark.parametrize("divergence, value, arithmetic", [
    ("forward_kl", 0.466165, "f'(t) = 1 - 1/t: -logσ(β((1 - e^-.5) - (1 - e^.5)))"),
    ("js_divergence", 0.575939, "f'(t) = ln 2 + logσ(log t): -logσ(β(logσ(.5) - logσ(-.5)))"),
    ("alpha_divergence", 0.472108, "α = .5: f'(t) = (t^-.5 - 1)/-.5: -logσ(β·2(e^.25 - e^-.25))"),
])
def test_f_divergences(divergence, value, arithmetic):
    assert loss("sigmoid", f_divergence_type=divergence, f_alpha_divergence_coef=0.5) == pytest.approx(value, abs=1e-6)


def test_aot_sorts_across_the_batch():
    """Policy gaps [1, -2] -> sorted [-2, 1]; reference gaps [-2, 2] -> [-2, 2]; Δ = [0, -1]; β = 1:
    [ln 2, ln(1 + e)] = [0.693147, 1.313262]. Unpaired: chosen ratios [2, -3] -> [-3, 2], rejected
    [-1, 1]; Δ = [-2, 1]: [ln(1 + e²), ln(1 + e⁻¹)] = [2.126928, 0.313262]."""
    args = (mx.array([-1.0, -4.0]), mx.array([-2.0, -2.0]), mx.array([-3.0, -1.0]), mx.array([-1.0, -3.0]))
    assert preference_loss(*args, loss_type="aot", beta=1.0).tolist() == pytest.approx([0.693147, 1.313262], abs=1e-6)
    assert preference_loss(*args, loss_type="aot_unpaired", beta=1.0).tolist() == pytest.approx(
        [2.126928, 0.313262], abs=1e-6)


def test_weighted_combination_like_trl():
    """sigmoid + 0.5·sft = 0.474077 + 0.5 = 0.974077."""
    assert loss(["sigmoid", "sft"], loss_weights=[1.0, 0.5]) == pytest.approx(0.974077, abs=1e-6)


def test_several_rejected():
    """K = 2 rejected: -3 and -2.2 (reference -2.5 both), chosen as before. h = β·log-ratio:
    h_w = 0.25, h = [-0.25, 0.15]. Pairwise mean: (-logσ(0.5) - logσ(0.1))/2 = 0.559237.
    Plackett-Luce: ln(1 + e^-0.5 + e^-0.1) = 0.920828."""
    args = (mx.array([-2.0]), mx.array([[-3.0, -2.2]]), mx.array([-2.5]), mx.array([[-2.5, -2.5]]))
    assert preference_loss(*args, beta=0.5).item() == pytest.approx(0.559237, abs=1e-6)
    assert preference_loss(*args, beta=0.5, rejected_aggregation="softmax").item() == pytest.approx(0.920828, abs=1e-6)


def test_plackett_luce_is_dpo_at_k1():
    assert loss("sigmoid", rejected_aggregation="softmax") == pytest.approx(0.474077, abs=1e-6)


def test_reference_free_is_dpo_with_zero_reference():
    """No reference: x = -2 - (-3) = 1 as a raw gap, β = 0.5: -logσ(0.5) = 0.474077 again."""
    out = preference_loss(mx.array([-2.0]), mx.array([-3.0]), beta=0.5)
    assert out.item() == pytest.approx(0.474077, abs=1e-6)
    assert loss("sigmoid", reference_free=True) == pytest.approx(0.474077, abs=1e-6)


def test_policy_equal_to_reference_is_ln2():
    x = mx.array([-5.0, -1.0, -9.0])
    y = mx.array([-7.0, -2.0, -3.0])
    assert preference_loss(x, y, x, y).tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "nope"}, "unknown loss_type 'nope'"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "2 loss types but 1 loss_weights"),
    ({"loss_type": "ipo", "rejected_aggregation": "softmax"}, "defined for 'sigmoid'"),
    ({"betta": 1.0}, "unknown loss option(s): betta"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preference_loss(mx.array([-2.0]), mx.array([-3.0]), mx.array([-2.5]), mx.array([-2.5]), **kwargs)


def test_large_margins_stay_finite():
    """log σ(-500) must be -500, not -inf: the loss uses logaddexp."""
    out = preference_loss(mx.array([-1000.0]), mx.array([0.0]), mx.array([0.0]), mx.array([0.0]), beta=0.5)
    assert out.item() == pytest.approx(500.0, rel=1e-6)


def test_train_config_knows_every_loss():
    from mlx_dpo.trainer.config import LOSS_TYPES

    assert set(LOSS_TYPES) == set(LOSSES)


def test_pairwise_mean_equals_k_separate_pairs():
    policy_chosen = mx.array([-2.0, -4.0])
    policy_rejected = mx.array([[-3.0, -1.0, -2.5], [-4.5, -6.0, -3.0]])
    ref_chosen = mx.array([-2.2, -3.9])
    ref_rejected = mx.array([[-2.9, -1.5, -2.0], [-4.0, -5.5, -3.3]])
    together = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.3)
    separate = sum(preference_loss(policy_chosen, policy_rejected[:, k], ref_chosen, ref_rejected[:, k], beta=0.3)
                   for k in range(3)) / 3
    assert together.tolist() == pytest.approx(separate.tolist(), abs=1e-6)
