"""FedAvg in one process, without Flower, for comparing designs quickly: the DP classifier
baseline (``fedtwin.baseline``) and the settings sweep (``scripts/sweep.py``). Each hospital
runs the same DP round as in a federation (``fedtwin.training.local_round``); the weights
are averaged by example count. The federation itself is the Flower app."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from fedtwin.data import Hospital
from fedtwin.privacy import PrivacyPlan
from fedtwin.seeds import derive_seed
from fedtwin.tensors import set_weights
from fedtwin.training import RoundResult, local_round


def fedavg(weights: list[Mapping[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    """Example-weighted average of state dicts with the same keys and shapes."""
    total = float(sum(counts))
    pairs = list(zip(weights, counts, strict=True))
    return {k: sum(n / total * w[k] for w, n in pairs) for k in weights[0]}


def run_rounds(
    model_for: Callable[[int], torch.nn.Module],
    weights: Mapping[str, np.ndarray],
    hospitals: list[Hospital],
    plans: list[PrivacyPlan],
    *,
    rounds: int,
    local_steps: int,
    batch_size: int,
    seed: int,
    keep_optimizer: bool = False,
    histories: list[list] | None = None,
    on_round: Callable[[int, dict, list[RoundResult]], None] | None = None,
    desc: str = "rounds",
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], list[RoundResult]]:
    """``rounds`` FedAvg rounds from ``weights``; ``model_for(i)`` is a fresh model for
    hospital ``i`` (its weights are set here). ``on_round(round, weights, results)`` is
    called after each average. Returns the last weights and the last round's results
    (``result.epsilon``: what each hospital has spent). ``histories``: what each hospital
    had spent before the first round (its one-shot releases), as ``local_round`` takes it."""
    histories = [list(h) for h in histories or [[] for _ in hospitals]]
    optimizer_states = [b""] * len(hospitals)  # kept between rounds with keep_optimizer
    results: list[RoundResult] = []
    for rnd in tqdm(range(1, rounds + 1), desc=desc, disable=not progress):
        results = []
        for i, h in enumerate(hospitals):
            model = model_for(i)
            set_weights(model, weights)
            r = local_round(
                model,
                h.train.images,
                h.train.labels,
                plans[i],
                steps=local_steps,
                batch_size=batch_size,
                history=histories[i],
                seed=derive_seed(seed, rnd, i),
                optimizer_state=optimizer_states[i] if keep_optimizer else b"",
            )
            histories[i] = r.history
            if keep_optimizer:
                optimizer_states[i] = r.optimizer_state
            results.append(r)
        weights = fedavg([r.weights for r in results], [r.num_examples for r in results])
        if on_round is not None:
            on_round(rnd, weights, results)
    return dict(weights), results
