"""The baseline a twin must beat: a classifier trained federated with DP-SGD on real data.

Same hospitals, same privacy plan, same DP round (``fedtwin.training.local_round``) as the
generator; the classifier is simply the private module. The FedAvg loop runs in-process
without Flower (``fedtwin.inprocess``): a baseline of the science, not of the deployment.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fedtwin.data import Hospital
from fedtwin.inprocess import run_rounds
from fedtwin.metrics import Classifier
from fedtwin.models.base import DPTrainable, private_step
from fedtwin.privacy import plan_from_config
from fedtwin.seeds import derive_seed
from fedtwin.tensors import get_weights, set_weights


class DPClassifier(DPTrainable):
    """A ``Classifier`` trained on real images with DP-SGD; the whole model is private."""

    def __init__(self, n_classes: int, lr: float = 1e-3, channels: int = 1):
        super().__init__()
        self.classifier = Classifier(n_classes, channels)
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
    n_classes, channels = len(cfg["data"]["classes"]), int(cfg["data"].get("channels", 1))
    torch.manual_seed(int(cfg["seed"]))
    global_model = DPClassifier(n_classes, lr, channels)
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
    weights, results = run_rounds(
        lambda i: DPClassifier(n_classes, lr, channels),
        get_weights(global_model),
        hospitals,
        plans,
        rounds=rounds,
        local_steps=local_steps,
        batch_size=batch_size,
        seed=derive_seed(int(cfg["seed"]), "baseline"),
        desc="DP classifier rounds",
        progress=progress,
    )
    set_weights(global_model, weights)
    epsilons = {h.name: r.epsilon for h, r in zip(hospitals, results, strict=True)}
    return global_model.classifier.eval(), epsilons
