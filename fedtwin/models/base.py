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
from torch import nn


class DPTrainable(nn.Module, ABC):
    """Anything ``fedtwin.training.local_round`` can train with DP-SGD.

    Images are float tensors ``(N, 1, H, W)`` scaled to ``[-1, 1]``; labels are int64 ``(N,)``.
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
        """One step on a Poisson-sampled batch ``real (B, 1, H, W)``, ``labels (B,)``.

        ``private`` is the (possibly Opacus-wrapped) private module; it must be used in
        place of ``private_module()``. Anything data-independent that the step adds to the
        private module's batch (fake images, say) must have a fixed size, here
        ``expected_batch``, so that one real image changes at most one clipped gradient.
        Exactly one ``private_opt.step()`` per call. Returns scalar losses for logging.
        """


class TwinGenerator(DPTrainable):
    """A class-conditional image generator trained with DP-SGD on its ``private_module``."""

    name: str
    n_classes: int
    image_size: int

    @abstractmethod
    @torch.no_grad()
    def sample(self, labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Draw one image per label: ``labels (N,)`` -> images ``(N, 1, H, W)`` in [-1, 1]."""
