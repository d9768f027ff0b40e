"""Class-conditional DCGAN for small grayscale images (28 x 28 by default).

The discriminator has no BatchNorm (Opacus needs per-sample gradients). By default it is
an AC-GAN discriminator: it sees the image only, and besides its real/fake logit it
predicts the class, a head trained on real images; the generator learns to make images of
the class it was asked for. The discriminator is the only module that sees real images,
so it is the one trained with DP-SGD; the generator only learns through it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtwin.models.base import TwinGenerator, private_step


@dataclass(frozen=True)
class DCGANConfig:
    n_classes: int = 2
    image_size: int = 28
    latent_dim: int = 64
    g_width: int = 16  # generator base channels
    d_width: int = 32  # discriminator base channels
    lr_g: float = 5e-4
    lr_d: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    d_steps: int = 1  # discriminator (DP) steps per generator step
    mode_seeking: float = 0.2  # weight of the mode-seeking term that keeps G from collapsing
    # How D uses the label: "aux" (D sees the image only, and also predicts its class, as
    # in AC-GAN) or "planes" (one-hot planes stacked on the image, as in cGAN).
    conditioning: str = "aux"
    aux_weight: float = 3.0  # weight of the class loss with "aux"


class Generator(nn.Module):
    """``z (N, latent_dim)``, ``y (N,)`` -> images ``(N, 1, S, S)`` in [-1, 1], S = image_size."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        if cfg.image_size % 4:
            raise ValueError(f"data.image_size must be a multiple of 4, got {cfg.image_size}")
        self.base = cfg.image_size // 4
        w = cfg.g_width
        self.embed = nn.Embedding(cfg.n_classes, cfg.latent_dim)
        self.fc = nn.Sequential(
            nn.Linear(2 * cfg.latent_dim, 4 * w * self.base**2),
            nn.BatchNorm1d(4 * w * self.base**2),
            nn.ReLU(),
        )
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1),  # base -> 2 base
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1),  # 2 base -> 4 base
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1))
        return self.up(h.view(z.shape[0], -1, self.base, self.base))


class Discriminator(nn.Module):
    """images ``(N, 1, S, S)``, ``y (N,)`` -> logits ``(N, 1 + n_classes)`` or ``(N, 1)``.

    "aux" (AC-GAN): the image alone gives a real/fake logit and class logits; under DP the
    class head is what makes the twins' labels mean something (it is trained on real images
    with the same clipped, noised gradient as the real/fake logit). "planes" (cGAN): the
    label enters as one-hot planes stacked on the image, and only the real/fake logit comes
    out. No BatchNorm (Opacus).
    """

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        k = cfg.n_classes
        outputs = {"planes": 1, "aux": 1 + k}
        if cfg.conditioning not in outputs:
            raise ValueError(
                f"model.conditioning={cfg.conditioning!r}: expected one of {', '.join(outputs)}"
            )
        w = cfg.d_width
        self.n_classes = k
        self.classifies = cfg.conditioning == "aux"  # class logits after the real/fake one
        self.features = nn.Sequential(
            nn.Conv2d(1 + (not self.classifies) * k, w, 4, stride=2, padding=1),  # S -> S/2
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),  # S/2 -> S/4
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * w * (cfg.image_size // 4) ** 2, outputs[cfg.conditioning]),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(N, 1)`` real/fake logits, then (with "aux") ``n_classes`` class logits."""
        if self.classifies:
            return self.features(x)  # the label is what D predicts, not what it is told
        planes = F.one_hot(y, self.n_classes).to(x.dtype)[:, :, None, None]
        planes = planes.expand(-1, -1, x.shape[2], x.shape[3])
        return self.features(torch.cat([x, planes], dim=1))


class DCGAN(TwinGenerator):
    """Generator + discriminator, exchanged together; D is the DP-trained private module."""

    name = "dcgan"

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        self.cfg = cfg
        self.n_classes = cfg.n_classes
        self.image_size = cfg.image_size
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)
        self._d_steps_done = 0

    def private_module(self) -> nn.Module:
        return self.discriminator

    def make_optimizers(self) -> tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_d, betas=betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr_g, betas=betas)
        return opt_d, [opt_g]

    def _fake(self, n: int, rng: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.cfg.latent_dim, generator=rng).to(device)
        y = self._labels(n, rng).to(device)
        return self.generator(z, y), y

    def _labels(self, n: int, rng: torch.Generator) -> torch.Tensor:
        if self.label_prior is None:
            return torch.randint(0, self.n_classes, (n,), generator=rng)
        return torch.multinomial(self.label_prior, n, replacement=True, generator=rng)

    def train_step(self, private, real, labels, private_opt, other_opts, expected_batch, rng):
        device = real.device
        (opt_g,) = other_opts
        # Discriminator. Generated images are data-independent: their gradient is exact.
        with torch.no_grad():
            fake, fake_y = self._fake(max(2, expected_batch), rng, device)  # BatchNorm needs 2
        params = [p for p in private.parameters() if p.requires_grad]
        with _hooks_off(private):
            loss_fake = self._d_loss(private(fake, fake_y), fake_y, real=False).mean()
            fake_grads = dict(zip(params, torch.autograd.grad(loss_fake, params), strict=True))
        # Real images: per-sample gradients, clipped and noised by the DP optimizer.
        private_opt.zero_grad(set_to_none=True)
        per_image = self._d_loss(private(real, labels), labels, real=True)
        loss_real = per_image.sum() / max(1, len(real))  # an empty Poisson batch gives 0
        loss_real.backward()
        private_step(private_opt, fake_grads)
        loss_d = loss_real + loss_fake
        self._d_steps_done += 1
        if self._d_steps_done % self.cfg.d_steps:
            return {"loss_d": loss_d.item()}

        # Generator: learns only through the (already private) discriminator.
        with _hooks_off(private):
            opt_g.zero_grad(set_to_none=True)
            loss_g = self._generator_loss(private, expected_batch, rng, device)
            loss_g.backward()
            opt_g.step()
            private_opt.zero_grad(set_to_none=True)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item()}

    def _d_loss(self, out: torch.Tensor, y: torch.Tensor, real: bool) -> torch.Tensor:
        """Per-image discriminator loss: real/fake, plus (AC-GAN) the class of real images.

        The class head learns from real images only; generated ones would teach it the
        generator's mistakes.
        """
        target = torch.full((len(out),), float(real), device=out.device)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], target, reduction="none")
        if real and self.discriminator.classifies:
            loss = loss + self.cfg.aux_weight * F.cross_entropy(out[:, 1:], y, reduction="none")
        return loss

    def _generator_loss(self, private, n: int, rng: torch.Generator, device) -> torch.Tensor:
        """Non-saturating GAN loss, the class loss (AC-GAN) and the mode-seeking term (Mao
        et al., 2019).

        The batch is two halves with the same labels and different noise; the mode-seeking
        term grows when two noise vectors give nearly the same image, which is what collapse
        looks like. None of this touches real data, so it costs no privacy.
        """
        half = max(1, n // 2)
        z = torch.randn(2 * half, self.cfg.latent_dim, generator=rng).to(device)
        y = self._labels(half, rng).repeat(2).to(device)
        fake = self.generator(z, y)
        out = private(fake, y)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], torch.ones(len(fake), device=device))
        if self.discriminator.classifies:  # AC-GAN: images D classifies as their label
            loss = loss + self.cfg.aux_weight * F.cross_entropy(out[:, 1:], y)
        if self.cfg.mode_seeking > 0:
            image_gap = (fake[:half] - fake[half:]).abs().mean(dim=(1, 2, 3))
            noise_gap = (z[:half] - z[half:]).abs().mean(dim=1)
            loss = loss + self.cfg.mode_seeking / ((image_gap / noise_gap).mean() + 1e-5)
        return loss

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        z = torch.randn(len(labels), self.cfg.latent_dim, generator=rng)
        out = self.generator(z.to(labels.device), labels)
        self.generator.train(was_training)
        return out


@contextmanager
def _hooks_off(module: nn.Module):
    """Switch off Opacus' per-sample-gradient hooks for passes that see no real image."""
    wrapped = hasattr(module, "disable_hooks")
    if wrapped:
        module.disable_hooks()
    try:
        yield
    finally:
        if wrapped:
            module.enable_hooks()
