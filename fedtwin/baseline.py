"""The baseline a twin must beat: a classifier trained federated with DP-SGD on real data.

Same hospitals, same privacy plan, same DP round (``fedtwin.training.local_round``) as the
generator; the classifier is simply the private module. The FedAvg loop runs in-process
without Flower: this is a baseline of the science, not of the deployment.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fedtwin.data import Hospital
from fedtwin.metrics import Classifier
from fedtwin.models.base import DPTrainable, private_step
from fedtwin.privacy import plan_from_config
from fedtwin.tensors import get_weights, set_weights
from fedtwin.training import local_round


class DPClassifier(DPTrainable):
    """A ``Classifier`` trained on real images with DP-SGD; the whole model is private."""

    def __init__(self, n_classes: int, lr: float = 1e-3):
        super().__init__()
        self.classifier = Classifier(n_classes)
        self.lr = lr

    def private_module(self) -> torch.nn.Module:
        return self.classifier

    def make_optimizers(self) -> tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]:
        return torch.optim.Adam(self.classifier.parameters(), lr=self.lr), []

    def train_step(self, private, real, labels, private_opt, other_opts, expected_batch, rng):
        private_opt.zero_grad(set_to_none=True)
        # sum / batch size: an empty Poisson batch gives a zero loss instead of NaN
        loss = F.cross_entropy(private(real), labels, reduction="sum") / max(1, len(real))
        loss.backward()
        private_step(private_opt, {})
        return {"loss": loss.item()}


def fedavg(weights: list[Mapping[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    """Example-weighted average of state dicts with the same keys and shapes."""
    total = float(sum(counts))
    pairs = list(zip(weights, counts, strict=True))
    return {k: sum(n / total * w[k] for w, n in pairs) for k in weights[0]}


def train_federated_dp_classifier(
    hospitals: list[Hospital],
    cfg: Mapping,
    *,
    rounds: int,
    local_steps: int,
    batch_size: int,
    lr: float = 1e-3,
    max_grad_norm: float = 1.0,
    progress: bool = False,
) -> tuple[Classifier, dict[str, float]]:
    """FedAvg of DP-SGD classifiers; returns the global classifier and epsilon per hospital.

    ``max_grad_norm`` is the classifier's own clipping bound (its per-sample gradients are
    far smaller than the discriminator's); the rest of the plan is ``cfg.privacy`` (the
    class-count release it reserves is not used here, so the epsilon spent stays below).
    """
    n_classes = len(cfg["data"]["classes"])
    torch.manual_seed(int(cfg["seed"]))
    global_model = DPClassifier(n_classes, lr)
    plans = [
        plan_from_config(
            cfg["privacy"],
            n_train=len(h.train),
            batch_size=batch_size,
            total_steps=rounds * local_steps,
            max_grad_norm=max_grad_norm,
        )
        for h in hospitals
    ]
    histories: list[list] = [[] for _ in hospitals]
    epsilons = {h.name: 0.0 for h in hospitals}
    for r in tqdm(range(rounds), desc="DP classifier rounds", disable=not progress):
        results = []
        for i, h in enumerate(hospitals):
            local = DPClassifier(n_classes, lr)
            set_weights(local, get_weights(global_model))
            res = local_round(
                local,
                h.train.images,
                h.train.labels,
                plans[i],
                steps=local_steps,
                batch_size=batch_size,
                history=histories[i],
                seed=int(cfg["seed"]) * 1000 + r * 10 + i,
            )
            histories[i], epsilons[h.name] = res.history, res.epsilon
            results.append(res)
        set_weights(
            global_model,
            fedavg([r.weights for r in results], [r.num_examples for r in results]),
        )
    return global_model.classifier.eval(), epsilons
