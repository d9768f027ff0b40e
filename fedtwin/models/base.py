"""The interface every twin generator implements.

The federation, the DP round, the twin writer and the report only talk to this interface,
so a new kind of generator (a diffusion model, say) plugs in without touching them.

A generator is one ``nn.Module`` whose ``state_dict`` is what hospitals and the server
exchange. Exactly one of its sub-modules sees real images: ``private_module``. That one is
trained with DP-SGD; everything else may only learn from it (post-processing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from opacus.optimizers import DPOptimizer
from torch import nn


class DPTrainable(nn.Module, ABC):
    """Anything ``fedtwin.training.local_round`` can train with DP-SGD.

    Images are float tensors ``(N, C, H, W)`` scaled to ``[-1, 1]``; labels are int64 ``(N,)``.
    """

    @abstractmethod
    def private_module(self) -> nn.Module:
        """The sub-module that touches real images; the DP round wraps it with Opacus."""

    @abstractmethod
    def make_optimizers(self) -> tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]:
        """Optimizer of the private module, and optimizers of the other modules."""

    @abstractmethod
    def train_step(
        self,
        private: nn.Module,
        real: torch.Tensor,
        labels: torch.Tensor,
        private_opt: torch.optim.Optimizer,
        other_opts: list[torch.optim.Optimizer],
        expected_batch: int,
        rng: torch.Generator,
    ) -> dict[str, float]:
        """One step on a Poisson-sampled batch ``real (B, C, H, W)``, ``labels (B,)``.

        ``private`` is the (possibly Opacus-wrapped) private module; it must be used in
        place of ``private_module()``. Only the loss on real images may go through the
        per-sample path; gradients of data-independent terms (the discriminator's loss on
        generated images, say) go to ``private_step`` as ``public_grads``. The batch may be
        empty (Poisson sampling). ``expected_batch`` is the mean real batch size. Exactly one
        ``private_step`` per call. Returns scalar losses for logging.
        """


def private_step(
    optimizer: torch.optim.Optimizer, public_grads: dict[nn.Parameter, torch.Tensor]
) -> None:
    """Update the private module: DP-SGD on the real-data gradient, public gradients added.

    With DP on, ``optimizer`` is Opacus' ``DPOptimizer``: its ``pre_step`` clips the
    per-sample gradients of the real images, adds the calibrated noise, averages and counts
    the step for the accountant. ``public_grads`` are gradients of terms that depend on no
    real image (they are computed from the already-private weights and fresh random
    numbers: post-processing), so they are added exactly, without clipping or noise.
    Clipping them together with the real ones would bias the discriminator: generated
    images from a near-collapsed generator have aligned gradients that survive clipping
    while the diverse real ones partly cancel.
    """
    inner = optimizer
    if isinstance(optimizer, DPOptimizer):
        if not optimizer.pre_step():  # a skipped (virtual) step: nothing to apply
            return
        inner = optimizer.original_optimizer
    for p, g in public_grads.items():
        p.grad = g.clone() if p.grad is None else p.grad + g
    inner.step()


class TwinGenerator(DPTrainable):
    """A class-conditional image generator trained with DP-SGD on its ``private_module``."""

    name: str
    n_classes: int
    image_size: int
    channels: int = 1
    # Class probabilities (n_classes,) for the labels drawn while training: the hospital's
    # noisy label mix, so its discriminator is not taught to reject classes it holds no
    # real images of. None = uniform.
    label_prior: torch.Tensor | None = None

    @abstractmethod
    @torch.no_grad()
    def sample(self, labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Draw one image per label: ``labels (N,)`` -> images ``(N, C, H, W)`` in [-1, 1]."""
