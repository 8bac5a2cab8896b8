"""DPO loss from sequence log-probs: pure functions, per-example outputs."""

import mlx.core as mx


def log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(0.0, -x)  # stable for large |x|


def dpo_loss(
    policy_chosen_logps: mx.array,
    policy_rejected_logps: mx.array,
    ref_chosen_logps: mx.array,
    ref_rejected_logps: mx.array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7); with ε = label_smoothing, conservative DPO
    (Mitchell 2023): -(1-ε)·logσ(βx) - ε·logσ(-βx), x = (π_c - ref_c) - (π_r - ref_r).

    All inputs (B,). Returns per-example (losses, chosen_rewards, rejected_rewards), rewards being
    β·(policy - reference). Example: policy -2/-3, ref -2.5/-2.5, β 0.5 -> rewards +0.25/-0.25,
    logit 0.5, loss ln(1 + e^-0.5) = 0.474077.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    logits = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * log_sigmoid(logits) - label_smoothing * log_sigmoid(-logits)
    return losses, chosen_rewards, rejected_rewards
