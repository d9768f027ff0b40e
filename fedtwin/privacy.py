"""Privacy planning and accounting (Opacus accountants); no training code in here.

A hospital plans its whole participation up front: sample rate q and total number of
DP-SGD steps T. The noise multiplier is calibrated so that T steps at rate q land at or
under the hospital's target epsilon at delta. Every step taken is recorded in an accountant
history ``[(noise_multiplier, sample_rate, steps), ...]`` that outlives any one process; the
epsilon spent is always recomputed from that history, never estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]


class BudgetExceeded(RuntimeError):
    """Training would push a hospital past its epsilon budget; the round is refused."""


@dataclass(frozen=True)
class PrivacyPlan:
    """What one hospital will spend over the whole federation.

    ``noise_multiplier`` is sigma (noise std = sigma * max_grad_norm); 0 when DP is off.
    """

    enabled: bool
    target_epsilon: float
    delta: float
    max_grad_norm: float
    sample_rate: float
    total_steps: int
    noise_multiplier: float
    accountant: str

    def describe(self) -> str:
        if not self.enabled:
            return "DP off: epsilon = inf (no privacy guarantee; baseline only)"
        return (
            f"DP-SGD: target epsilon {self.target_epsilon:g} at delta {self.delta:g}, "
            f"sigma {self.noise_multiplier:.3f}, C {self.max_grad_norm:g}, "
            f"q {self.sample_rate:.4f}, {self.total_steps} steps ({self.accountant})"
        )


def sample_rate_for(n_train: int, batch_size: int) -> float:
    """Poisson sample rate as Opacus derives it from a DataLoader: 1 / number of batches."""
    if n_train <= 0:
        raise ValueError("a hospital needs at least one training image")
    return 1.0 / math.ceil(n_train / batch_size)


def plan_privacy(
    *,
    enabled: bool,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    accountant: str,
    n_train: int,
    batch_size: int,
    total_steps: int,
) -> PrivacyPlan:
    """Calibrate sigma so that ``total_steps`` steps land at or under ``epsilon`` at ``delta``."""
    q = sample_rate_for(n_train, batch_size)
    if not enabled:
        return PrivacyPlan(False, math.inf, delta, max_grad_norm, q, total_steps, 0.0, accountant)
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(
            f"privacy.epsilon must be > 0 and privacy.delta in (0, 1); got {epsilon}, {delta}"
        )
    if delta >= 1.0 / n_train:
        # delta should be well below 1/n, or one whole record may leak with probability delta.
        raise ValueError(
            f"privacy.delta={delta:g} is not below 1/n = {1.0 / n_train:g} for a hospital with "
            f"{n_train} training images; lower privacy.delta"
        )
    sigma = get_noise_multiplier(
        target_epsilon=epsilon,
        target_delta=delta,
        sample_rate=q,
        steps=total_steps,
        accountant=accountant,
    )
    return PrivacyPlan(True, epsilon, delta, max_grad_norm, q, total_steps, sigma, accountant)


def epsilon_spent(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of all the steps in ``history`` at ``delta``; 0 for an empty history."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def check_budget(plan: PrivacyPlan, history: History, steps: int) -> float:
    """Epsilon after ``steps`` more steps; raises BudgetExceeded if that passes the target."""
    if not plan.enabled:
        return math.inf
    after = [*history, (plan.noise_multiplier, plan.sample_rate, steps)]
    projected = epsilon_spent(after, plan.delta, plan.accountant)
    if projected > plan.target_epsilon + 1e-9:
        spent = epsilon_spent(history, plan.delta, plan.accountant)
        raise BudgetExceeded(
            f"refused: {steps} more steps would spend epsilon {projected:.3f} > budget "
            f"{plan.target_epsilon:g} (spent so far {spent:.3f} at delta {plan.delta:g})"
        )
    return projected
