"""Canaries: an audit that shows it can see, and an empirical lower bound on epsilon.

With ``audit.canaries = m`` each hospital makes ``m`` synthetic canary records, never patient
data, and trains on each with probability 1/2 by a coin only it knows (Steinke, Nasr and
Jagielski, "Privacy auditing with one (1) training run", NeurIPS 2023). After training it
scores every canary by how member-like it looks to the model it released, guesses "in" on
the most member-like and "out" on the least, abstains on the middle, and sends only two
counts: guesses made and guesses right. The server adds them up over the hospitals and
turns them into the largest epsilon that the counts reject at 95 % confidence
(:func:`epsilon_lower_bound`): a lower bound from an attack, never a guarantee.

- **Canaries** (:func:`make_canaries`): coarse random black-and-white block patterns
  (``GRID`` x ``GRID`` blocks of the image size) with a random class label, seeded by the
  run's seed and the hospital's name, so anyone may re-make them: the canaries are public,
  the coins are not. Independent random patterns are far from every chest X-ray and from
  each other, so what a model learns from one canary says nothing of another (the
  abstention test needs canaries whose memberships do not leak into each other).
- **Coins** (:func:`coins`): from a secret the hospital keeps beside its ledger
  (:func:`hospital_secret`, OS randomness, made once), not from the published seed.
- **Accounting**: the canaries taken are training records like any other, sampled at the
  plan's rate (:func:`loader_batch`), so the ledger's epsilon covers them. It stays the
  plan's epsilon for the hospital's own image count, and the reply's example count is that
  of its images: neither depends on the coins.
- **Guesses** (:func:`guess`): on a fixed share of the canaries, at the end of the scores
  ``audit.canary_side`` names; by default "out" on the least member-like: training drives
  a member's loss down, so a high loss is strong evidence of a non-member, while a
  non-member can score low by chance (docs/audit.md has the measurement).
- **Scores** (:func:`canary_scores`): with a discriminator (the GAN), white box: minus the
  per-image loss it trained with, under the weights the hospital last sent and with its
  label mix (the class head's shift while training; without it a skewed hospital's
  scores sort by class, not by membership); otherwise the twin: minus the pixel distance
  to the nearest twin image (GAN-Leaks).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from fedtwin.audit import pixels
from fedtwin.data import Split
from fedtwin.neighbours import nearest
from fedtwin.seeds import derive_seed
from fedtwin.tensors import to_tensor

GRID = 7  # canary blocks per side: coarse enough for a generator to reproduce
CONFIDENCE = 0.95  # of the lower bound (p < 0.05 under the null hypothesis)
SECRET_BYTES = 32
SIDES = ("out", "in", "both")  # which end of the scores the audit guesses on


def make_canaries(
    m: int, image_shape: tuple[int, ...], n_classes: int, seed: int, hospital: str
) -> Split:
    """``m`` canary images ``(m, *image_shape)`` uint8 with labels ``(m,)``: random
    ``GRID`` x ``GRID`` black-and-white blocks, upsampled (each colour channel alike)."""
    rng = np.random.default_rng(derive_seed(seed, hospital, "canaries"))
    size = image_shape[0]
    blocks = rng.integers(0, 2, (m, GRID, GRID), dtype=np.uint8) * 255
    cells = np.linspace(0, GRID, size, endpoint=False).astype(int)
    images = blocks[:, cells][:, :, cells]
    if len(image_shape) == 3:
        images = np.repeat(images[..., None], image_shape[2], axis=3)
    return Split(np.ascontiguousarray(images), rng.integers(0, n_classes, m).astype(np.int64))


def hospital_secret(path: Path) -> bytes:
    """The hospital's canary secret at ``path`` (beside its ledger): made once from OS
    randomness, readable by the hospital alone (mode 0600), never overwritten."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by a message of the same hospital meanwhile
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SECRET_BYTES))
    return path.read_bytes()


def coins(secret: bytes, hospital: str, m: int) -> np.ndarray:
    """Which canaries the hospital trains on: ``(m,)`` bool, each True with probability 1/2,
    from its secret (the same at every round and restart, unknown to everyone else)."""
    digest = hashlib.sha256(secret + b"canary-coins:" + hospital.encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.random(m) < 0.5


def with_canaries(train: Split, canaries: Split, taken: np.ndarray) -> Split:
    """The training records: the hospital's images, then the canaries its coins took."""
    return Split(
        np.concatenate([train.images, canaries.images[taken]]),
        np.concatenate([train.labels, canaries.labels[taken]]),
    )


def loader_batch(n_records: int, sample_rate: float) -> int:
    """The DataLoader batch size at which Opacus, which samples at 1 / number of batches,
    samples ``n_records`` records at exactly ``sample_rate`` (the plan's, in the ledger)."""
    batches = round(1.0 / sample_rate)
    for batch in range(math.ceil(n_records / batches), 0, -1):
        if math.ceil(n_records / batch) == batches:
            return batch
    raise ValueError(
        f"no batch size samples {n_records} records at rate {sample_rate:.4g}: "
        f"too many canaries for this hospital (lower audit.canaries)"
    )


@torch.no_grad()
def canary_scores(model: torch.nn.Module, canaries: Split, twin: np.ndarray) -> np.ndarray:
    """How member-like each canary looks, ``(m,)``, higher = more: minus the discriminator's
    per-image training loss when the model has one (white box), else minus the pixel
    distance to the nearest twin image."""
    if hasattr(model, "discriminator") and hasattr(model, "_d_loss"):
        model.eval()
        x, y = to_tensor(canaries.images), torch.as_tensor(canaries.labels)
        return -model._d_loss(model.discriminator(x, y), y, real=True).double().numpy()
    return -nearest(pixels(canaries.images), pixels(twin), 1)[:, 0]


def guess(scores: np.ndarray, share: float, side: str = "both") -> np.ndarray:
    """The audit's guesses ``(m,)`` on ``share`` of the canaries, abstaining (0) on the rest:
    with ``side`` "in", +1 on the most member-like; "out", -1 on the least; "both", half
    each."""
    if side not in SIDES:
        raise ValueError(f"audit.canary_side must be one of {', '.join(SIDES)}, got {side!r}")
    order = np.argsort(-scores, kind="stable")
    k = int(round(share * len(scores)))
    n_in = {"in": k, "out": 0, "both": k // 2}[side]
    n_out = k - n_in
    guesses = np.zeros(len(scores), dtype=np.int64)
    guesses[order[:n_in]] = 1
    guesses[order[len(order) - n_out :]] = -1
    return guesses


def tally(guesses: np.ndarray, taken: np.ndarray) -> dict[str, int]:
    """What leaves the hospital: canaries, guesses made, guesses right."""
    truth = np.where(taken, 1, -1)
    return {
        "canaries": len(guesses),
        "guessed": int(np.sum(guesses != 0)),
        "correct": int(np.sum(guesses == truth)),
    }


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of at least ``v`` right of ``r`` guesses on ``m`` canaries if training
    is (epsilon, delta)-DP (Steinke et al. 2023, Theorem 5.2 and its code): the binomial
    tail P[Bin(r, q) >= v], q = e^ε / (1 + e^ε), plus 2 m δ max_i P[v - i <= Bin(r, q) < v] / i."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guessed <= canaries, got {v}, {r}, {m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # i = 1 .. v
    alpha = float(np.max(below / np.arange(1, v + 1))) if v else 0.0
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float = 0.0, confidence: float = CONFIDENCE
) -> float:
    """The largest epsilon whose (epsilon, delta)-DP makes ``v`` of ``r`` right guesses
    unlikely (p-value below ``1 - confidence``); 0 when even epsilon = 0 does not.
    Bisection on the p-value, which grows with epsilon."""
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def pool_canaries(sites: list[dict], delta: float, accounted: float) -> dict:
    """The hospitals' counts added up, the lower bound they prove, the most any attack
    could prove with as many guesses (all right), and the accounted epsilon beside it."""
    m = sum(int(s["canaries"]) for s in sites)
    r = sum(int(s["guessed"]) for s in sites)
    v = sum(int(s["correct"]) for s in sites)
    return {
        "canaries": m,
        "guessed": r,
        "correct": v,
        "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta),
        "epsilon_lower_bound_max": epsilon_lower_bound(m, r, r, delta),
        "epsilon_accounted": accounted,
        "confidence": CONFIDENCE,
        "hospitals": len(sites),
    }
