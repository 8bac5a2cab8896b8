"""DPO loss against values worked out by hand."""

import math

import mlx.core as mx
import pytest

from mlx_dpo.trainer.loss import dpo_loss


def _loss(pc, pr, rc, rr, beta, eps=0.0):
    losses, chosen, rejected = dpo_loss(mx.array([pc]), mx.array([pr]), mx.array([rc]), mx.array([rr]), beta, eps)
    return losses.item(), chosen.item(), rejected.item()


def test_sigmoid_hand_worked():
    """policy -2/-3, ref -2.5/-2.5, β=0.5: rewards β(π-ref) = +0.25/-0.25, logit 0.5,
    loss = -log σ(0.5) = ln(1 + e^-0.5) = 0.474077."""
    loss, chosen, rejected = _loss(-2.0, -3.0, -2.5, -2.5, beta=0.5)
    assert loss == pytest.approx(0.474077, abs=1e-6)
    assert chosen == pytest.approx(0.25) and rejected == pytest.approx(-0.25)


def test_swapping_chosen_and_rejected_flips_rewards():
    """Swapped: rewards -0.25/+0.25, logit -0.5, loss ln(1 + e^0.5) = 0.974077."""
    loss, chosen, rejected = _loss(-3.0, -2.0, -2.5, -2.5, beta=0.5)
    assert loss == pytest.approx(0.974077, abs=1e-6)
    assert chosen == pytest.approx(-0.25) and rejected == pytest.approx(0.25)


def test_label_smoothing_hand_worked():
    """ε=0.1, logit 0.5: 0.9·ln(1+e^-0.5) + 0.1·ln(1+e^0.5) = 0.9·0.474077 + 0.1·0.974077 = 0.524077."""
    loss, _, _ = _loss(-2.0, -3.0, -2.5, -2.5, beta=0.5, eps=0.1)
    assert loss == pytest.approx(0.524077, abs=1e-6)


def test_policy_equal_to_reference_gives_ln2():
    losses, chosen, rejected = dpo_loss(mx.array([-5.0, -1.0]), mx.array([-7.0, -2.0]),
                                        mx.array([-5.0, -1.0]), mx.array([-7.0, -2.0]), 0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert (chosen - rejected).tolist() == [0.0, 0.0]


def test_large_margins_stay_finite():
    """log σ(-500) must be -500, not -inf: the loss uses logaddexp."""
    loss, _, _ = _loss(-1000.0, 0.0, 0.0, 0.0, beta=0.5)
    assert loss == pytest.approx(500.0, rel=1e-6)
