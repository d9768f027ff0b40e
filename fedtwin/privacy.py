"""Privacy planning and accounting (Opacus accountants); no training code in here.

A hospital plans its whole participation up front: one release of its class counts with
Gaussian noise (so generated labels can follow its own label mix), with the DCGAN one
release of its per-class feature sums with Gaussian noise (``fedtwin.features``), and T
DP-SGD steps at sample rate q. The noise multiplier is calibrated so that the whole plan
lands at or under the hospital's target epsilon at delta. Every step taken is recorded in an
accountant history ``[(noise_multiplier, sample_rate, steps), ...]`` that outlives any one
process; the epsilon spent is always recomputed from that history, never estimated.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import opacus
from opacus.accountants import create_accountant
from opacus.accountants.rdp import RDPAccountant

from fedtwin.cache import remembered

# What a calibrated noise level depends on besides its arguments: this file and Opacus.
_CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16] + "/" + opacus.__version__

# The integer RDP orders among Opacus's defaults: each has a closed-form bound
INTEGER_ORDERS = [a for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer()]

History = list[tuple[float, float, int]]


class BudgetExceeded(RuntimeError):
    """Training would push a hospital past its epsilon budget; the round is refused."""


@dataclass(frozen=True)
class PrivacyPlan:
    """What one hospital will spend over the whole federation.

    ``noise_multiplier`` is sigma (noise std = sigma * max_grad_norm); 0 when DP is off.
    ``label_noise`` is the std of the Gaussian noise on the class counts (sensitivity 1);
    ``feature_noise`` that on the per-class feature sums (sensitivity 1), 0 when the
    hospital releases none.
    """

    enabled: bool
    target_epsilon: float
    delta: float
    max_grad_norm: float
    sample_rate: float
    total_steps: int
    noise_multiplier: float
    accountant: str
    label_noise: float = 0.0
    feature_noise: float = 0.0

    def label_release(self) -> tuple[float, float, int]:
        return label_release(self.label_noise)

    def feature_release(self) -> tuple[float, float, int]:
        return label_release(self.feature_noise)  # one Gaussian at q = 1, like the counts

    def one_shot_releases(self) -> list[tuple[float, float, int]]:
        """The history entries of the releases made once, before any DP-SGD step."""
        releases = [self.label_release()]
        if self.feature_noise > 0:
            releases.append(self.feature_release())
        return releases

    def describe(self) -> str:
        if not self.enabled:
            return "DP off: epsilon = inf (no privacy guarantee; baseline only)"
        features = f", feature sums with noise std {self.feature_noise:g}"
        features = features if self.feature_noise else ""
        return (
            f"DP-SGD: target epsilon {self.target_epsilon:g} at delta {self.delta:g}, "
            f"sigma {self.noise_multiplier:.3f}, C {self.max_grad_norm:g}, "
            f"q {self.sample_rate:.4f}, {self.total_steps} steps, class counts with noise "
            f"std {self.label_noise:g}{features} ({self.accountant})"
        )


def label_release(label_noise: float) -> tuple[float, float, int]:
    """A one-shot release (class counts, feature sums) as an accountant history entry: one
    Gaussian mechanism of sensitivity 1 and noise std ``label_noise``, q = 1."""
    return (label_noise, 1.0, 1)


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
    label_noise: float,
    feature_noise: float = 0.0,
    prior: History = (),
) -> PrivacyPlan:
    """Calibrate sigma so that the class-count release (noise std ``label_noise``), the
    feature-sum release (``feature_noise``; 0 = none) and ``total_steps`` steps together
    land at or under ``epsilon`` at ``delta``, on top of ``prior``: what the hospital's
    ledger spent before this federation."""
    q = sample_rate_for(n_train, batch_size)
    if not enabled:
        return PrivacyPlan(False, math.inf, delta, max_grad_norm, q, total_steps, 0.0, accountant)
    if label_noise <= 0:
        raise ValueError(
            f"privacy.label_noise must be > 0 with DP on (exact class counts would leak), "
            f"got {label_noise}"
        )
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
    if feature_noise < 0:
        raise ValueError(f"privacy.feature_noise must be >= 0, got {feature_noise}")
    releases = (label_release(label_noise),)
    if feature_noise > 0:
        releases += (label_release(feature_noise),)
    if epsilon_spent(list(releases), delta, accountant) >= epsilon:
        with_features = f" with privacy.feature_noise={feature_noise:g}" if feature_noise else ""
        raise ValueError(
            f"privacy.label_noise={label_noise:g}{with_features} alone spends the whole budget "
            f"epsilon={epsilon:g}; raise privacy.label_noise"
            + (" or privacy.feature_noise" if feature_noise else "")
        )
    prior = tuple(tuple(h) for h in prior)
    _refuse_if_spent(prior, releases, epsilon, delta, accountant)
    sigma = _calibrated_sigma(epsilon, delta, q, total_steps, releases, accountant, prior)
    return PrivacyPlan(
        True,
        epsilon,
        delta,
        max_grad_norm,
        q,
        total_steps,
        sigma,
        accountant,
        label_noise,
        feature_noise,
    )


def plan_from_config(
    privacy: Mapping[str, Any],
    *,
    n_train: int,
    batch_size: int,
    total_steps: int,
    features: bool = False,
    **override,
) -> PrivacyPlan:
    """``plan_privacy`` with the settings of a ``privacy`` config group; ``features``: the
    model releases feature sums (``uses_features``), with the noise that spends
    ``privacy.feature_share`` of the budget (``feature_noise_for``); ``override`` replaces
    any setting (``enabled=False`` for a baseline, ``prior`` for a ledger's past, say)."""
    settings = {
        "enabled": bool(privacy["enabled"]),
        "epsilon": float(privacy["epsilon"]),
        "delta": float(privacy["delta"]),
        "max_grad_norm": float(privacy["max_grad_norm"]),
        "accountant": str(privacy["accountant"]),
        "label_noise": float(privacy["label_noise"]),
        **override,
    }
    if features and settings["enabled"] and "feature_noise" not in settings:
        settings["feature_noise"] = feature_noise_for(
            float(privacy["feature_share"]),
            epsilon=settings["epsilon"],
            delta=settings["delta"],
            label_noise=settings["label_noise"],
            accountant=settings["accountant"],
            prior=tuple(tuple(h) for h in override.get("prior", ())),
        )
    return plan_privacy(**settings, n_train=n_train, batch_size=batch_size, total_steps=total_steps)


def _refuse_if_spent(
    prior: tuple, releases: tuple, epsilon: float, delta: float, accountant: str
) -> None:
    """BudgetExceeded when earlier federations (``prior``) and this one's one-shot
    ``releases`` already reach ``epsilon``: a refusal, not a configuration error."""
    if prior and epsilon_spent([*prior, *releases], delta, accountant) >= epsilon:
        raise BudgetExceeded(
            f"refused: earlier federations spent epsilon "
            f"{epsilon_spent(list(prior), delta, accountant):.3f} of this hospital's budget "
            f"{epsilon:g}; nothing is left for this one"
        )


MAX_NOISE = 1e6  # a noise multiplier or std beyond this: no plan could use it


def _feature_spent(
    noise: float, *, delta: float, label_noise: float, accountant: str, prior: tuple
) -> float:
    """Epsilon after ``prior``, the class counts and a feature release of std ``noise``."""
    plan = [*prior, label_release(label_noise), label_release(noise)]
    return epsilon_spent(plan, delta, accountant)


def _feature_allowed(
    share: float, *, epsilon: float, delta: float, label_noise: float, accountant: str,
    prior: tuple,
) -> float:  # fmt: skip
    """What the feature release may bring the spent epsilon up to: ``share`` of what is
    left after ``prior`` and the class counts."""
    before = epsilon_spent([*prior, label_release(label_noise)], delta, accountant)
    return before + share * (epsilon - before)


def _feature_noise_fits(
    noise: float, share: float, *, epsilon: float, delta: float, label_noise: float,
    accountant: str, prior: tuple = (),
) -> bool:  # fmt: skip
    """Whether a stored feature noise is positive and spends no more than its share."""
    common = {"delta": delta, "label_noise": label_noise, "accountant": accountant}
    allowed = _feature_allowed(share, epsilon=epsilon, prior=prior, **common)
    return 0 < noise <= MAX_NOISE and _feature_spent(noise, prior=prior, **common) <= allowed


@functools.lru_cache(maxsize=64)
@remembered(_CODE, valid=_feature_noise_fits)  # every deployed message is a new process
def feature_noise_for(
    share: float, *, epsilon: float, delta: float, label_noise: float, accountant: str,
    prior: tuple = (),
) -> float:  # fmt: skip
    """The feature release's noise std (sensitivity 1): the smallest (to 1e-3) that spends at
    most ``share`` of the budget left after ``prior`` and the class-count release; the
    DP-SGD steps get the rest. A share, not a fixed noise, so one setting serves every
    epsilon."""
    if not 0 < share < 1:
        raise ValueError(f"privacy.feature_share must lie in (0, 1), got {share}")
    _refuse_if_spent(prior, (label_release(label_noise),), epsilon, delta, accountant)
    common = {"delta": delta, "label_noise": label_noise, "accountant": accountant}
    if epsilon_spent([*prior, label_release(label_noise)], delta, accountant) >= epsilon:
        raise ValueError(
            f"privacy.label_noise={label_noise:g} alone spends the whole budget "
            f"epsilon={epsilon:g}; raise privacy.label_noise"
        )
    allowed = _feature_allowed(share, epsilon=epsilon, prior=prior, **common)

    def spent(noise: float) -> float:
        return _feature_spent(noise, prior=prior, **common)

    low, high = 0.0, 1.0
    while spent(high) > allowed:
        low, high = high, 2 * high
        if high > MAX_NOISE:
            raise ValueError(
                f"no feature noise spends only privacy.feature_share={share:g} of epsilon "
                f"{epsilon:g}; raise privacy.feature_share"
            )
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > allowed else (low, mid)
    return high


def _fits(
    sigma: float, target: float, delta: float, q: float, steps: int, releases: tuple,
    accountant: str, prior: tuple = (),
) -> bool:  # fmt: skip
    """Whether ``steps`` steps at noise ``sigma``, after ``prior`` and the one-shot
    ``releases``, land at or under ``target``."""
    plan = [*prior, *releases, (sigma, q, steps)]
    # RDP: epsilon is the least over the orders of each order's bound, so the integer
    # orders alone (quick to compute) bound it from above; when that bound fits, so does
    # epsilon, and the slow fractional orders are needed only when it does not. The
    # answer is the same; the search takes about a quarter less time.
    if accountant == "rdp" and epsilon_spent(plan, delta, accountant, INTEGER_ORDERS) <= target:
        return True
    return epsilon_spent(plan, delta, accountant) <= target


def _sigma_fits(sigma: float, *args: Any, **kwargs: Any) -> bool:
    """Whether a stored noise multiplier is positive and still meets the budget."""
    return 0 < sigma <= MAX_NOISE and _fits(sigma, *args, **kwargs)


@functools.lru_cache(maxsize=64)  # a node plans again every round with the same numbers
@remembered(_CODE, valid=_sigma_fits)  # ... and in a deployment each round in a new process
def _calibrated_sigma(
    target: float,
    delta: float,
    q: float,
    steps: int,
    releases: tuple,
    accountant: str,
    prior: tuple = (),
) -> float:
    """Smallest sigma (to 1e-3) whose plan, after ``prior`` and the one-shot ``releases``,
    lands at or under ``target``."""

    def fits(sigma: float) -> bool:
        return _fits(sigma, target, delta, q, steps, releases, accountant, prior)

    low, high = 0.0, 10.0
    while not fits(high):
        high *= 2
        if high > MAX_NOISE:
            raise ValueError(f"no noise level reaches epsilon {target:g}; check the plan")
    while high - low > 1e-3:
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def epsilon_spent(
    history: History, delta: float, accountant: str = "rdp", orders: list | None = None
) -> float:
    """Epsilon of all the steps in ``history`` at ``delta``; 0 for an empty history.
    ``orders``: RDP only, the orders to take the least bound over (default: Opacus's)."""
    if not history:
        return 0.0
    for sigma, q, steps in history:
        # a NaN sigma would spin forever in Opacus's series; a negative one is meaningless
        if not (math.isfinite(sigma) and sigma >= 0 and 0 <= q <= 1 and steps >= 0):
            raise ValueError(
                f"accountant history entry (noise {sigma}, sample rate {q}, steps {steps}): "
                "not a noise >= 0, a rate in [0, 1] and steps >= 0; the ledger or plan is damaged"
            )
    acc = create_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    if orders is not None:
        return float(acc.get_epsilon(delta=delta, alphas=orders))
    return float(acc.get_epsilon(delta=delta))


def uses_features(cfg: Mapping[str, Any]) -> bool:
    """Whether the run's model has its hospitals release feature sums (``model.features``)."""
    return bool(cfg["model"].get("features"))


def check_budget(plan: PrivacyPlan, history: History, steps: int) -> float:
    """Epsilon after ``steps`` more steps; raises BudgetExceeded if that passes the target."""
    if not plan.enabled:
        return math.inf
    after = [*history, (plan.noise_multiplier, plan.sample_rate, steps)]
    projected = epsilon_spent(after, plan.delta, plan.accountant)
    if not projected <= plan.target_epsilon + 1e-9:  # NaN too: refused, never let through
        spent = epsilon_spent(history, plan.delta, plan.accountant)
        raise BudgetExceeded(
            f"refused: {steps} more steps would spend epsilon {projected:.3f} > budget "
            f"{plan.target_epsilon:g} (spent so far {spent:.3f} at delta {plan.delta:g})"
        )
    return projected


def noisy_class_shares(labels: np.ndarray, n_classes: int, plan: PrivacyPlan) -> np.ndarray:
    """Class probabilities ``(n_classes,)`` from the hospital's labels, DP when the plan is.

    Counts get Gaussian noise of std ``plan.label_noise`` (one image changes one count by 1)
    drawn from OS randomness; the caller records ``plan.label_release()`` in the history
    before anything derived from it leaves the hospital. Each class keeps a share of at
    least one image so no class is never generated.
    """
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    if plan.enabled:
        rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
        counts = counts + rng.normal(0.0, plan.label_noise, size=n_classes)
    counts = np.maximum(counts, 1.0)
    return counts / counts.sum()
