"""Class-conditional DCGAN for small images (28 x 28 by default; grayscale or colour).

The discriminator has no BatchNorm (Opacus needs per-sample gradients). By default it is
an AC-GAN discriminator: it sees the image only, and besides its real/fake logit it
predicts the class, a head trained on real images; the generator learns to make images of
the class it was asked for. The discriminator is the only module that sees real images,
so it is the one trained with DP-SGD; the generator only learns through it.

With ``features`` set, the model also carries the consortium's pooled, noisy per-class
feature statistics (``fedtwin.features``, released once by each hospital) as a buffer
exchanged with the weights: the generator is fitted to them at the server before training
(``warm_start``) and keeps them as an anchor in its loss (``anchor``) while the GAN
refines it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtwin.features import FeatureConfig, FeatureMap, class_means, moment_loss
from fedtwin.models.base import TwinGenerator, private_step

UPSAMPLING = ("nearest", "bilinear", "transposed")
SMALLEST = 8  # px: the generator starts, and the discriminator ends, at this size or less
MOST_CHANNELS = 8  # channels double at each halving of the resolution, up to 8x the width


def halvings(image_size: int) -> int:
    """Stride-2 stages between ``image_size`` and the smallest feature map (<= 8 px): 2 at
    28 and 32 px (7 and 8 px), 3 at 56 and 64, 4 at 112 and 128, 5 at 224 (7 px)."""
    n = 2
    while image_size / 2**n > SMALLEST:
        n += 1
    if image_size % 2**n:
        raise ValueError(
            f"data.image_size={image_size}: the DCGAN halves it {n} times to {SMALLEST} px or "
            f"less, so it must be a multiple of {2**n} (e.g. 28, 32, 64, 128, 224)"
        )
    return n


def d_width_for(image_size: int) -> int:
    """The discriminator's default base width at ``image_size``: 32 up to 32 px, 24 at 64,
    16 beyond. Its deeper stack at larger sizes adds parameters, and DP-SGD adds noise to
    every one of them while the clipped signal stays the same; narrower layers keep it
    within about 4x of 28 px's (five classes: 52k parameters; 64 px: 130k, 128 px: 222k,
    where a width of 32 would give 214k and 787k)."""
    return 32 if image_size <= 32 else 24 if image_size <= 64 else 16


def channels_at(width: int, halved: int) -> int:
    """Channels of a feature map halved ``halved`` times from the image: ``width`` at the
    image, doubling per halving, at most ``MOST_CHANNELS`` x ``width``."""
    return width * min(2**halved, MOST_CHANNELS)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between vertically and horizontally neighbouring pixels."""
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return dy + dx


@dataclass(frozen=True)
class DCGANConfig:
    n_classes: int = 2
    image_size: int = 28
    channels: int = 1  # 3 for colour
    latent_dim: int = 64
    g_width: int = 16  # generator base channels
    d_width: int | None = None  # discriminator base channels; None: by size (d_width_for)
    lr_g: float = 5e-4
    lr_d: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    d_steps: int = 1  # discriminator (DP) steps per generator step
    g_steps: int = 1  # generator steps after each of them (post-processing: no privacy cost)
    mode_seeking: float = 0.2  # weight of the mode-seeking term that keeps G from collapsing
    # How D uses the label: "aux" (D sees the image only, and also predicts its class, as
    # in AC-GAN) or "planes" (one-hot planes stacked on the image, as in cGAN).
    conditioning: str = "aux"
    aux_weight: float = 3.0  # weight of the class loss with "aux"
    # "nearest" or "bilinear": resize, then a 3 x 3 convolution (no checkerboard);
    # "transposed": 4 x 4 transposed convolutions of stride 2
    upsample: str = "nearest"
    # Weight of a total-variation penalty on generated images (mean absolute difference of
    # neighbouring pixels) in the warm start and G's loss: a smoothness prior that touches
    # no real image, so it costs no privacy. 0 = none.
    smoothness: float = 0.2
    # Train D's class head on logits shifted by the log of the hospital's (noisy) label mix
    # (logit adjustment): its logits then score the image alone, the same at every
    # hospital whatever its label mix, so averaging heads trained on skewed mixes agrees.
    class_balance: bool = True
    # The DP feature statistics (fedtwin.features.FeatureConfig fields), or None for none
    features: dict | None = None
    anchor: float = 50.0  # weight of the feature-moment term in G's loss (needs features)
    warm_start_batch: int = 128  # generated images per class per warm-start step
    warm_start_lr: float = 1e-3
    # Decay of an exponential moving average of the generator's weights, updated after
    # every generator step and exchanged with the weights; the twin is drawn from it. It
    # averages out the DP noise that reaches the generator through the discriminator
    # (post-processing: no privacy cost). 0 = none: the twin comes from the generator.
    ema: float = 0.0


class Generator(nn.Module):
    """``z (N, latent_dim)``, ``y (N,)`` -> images ``(N, C, S, S)`` in [-1, 1], S = image_size."""

    def __init__(self, cfg: DCGANConfig):
        super().__init__()
        if cfg.upsample not in UPSAMPLING:
            raise ValueError(f"model.upsample={cfg.upsample!r}: expected one of {UPSAMPLING}")
        n = halvings(cfg.image_size)
        self.base = cfg.image_size // 2**n
        w = cfg.g_width
        top = channels_at(w, n)
        self.embed = nn.Embedding(cfg.n_classes, cfg.latent_dim)
        self.fc = nn.Sequential(
            nn.Linear(2 * cfg.latent_dim, top * self.base**2),
            nn.BatchNorm1d(top * self.base**2),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for k in range(n, 0, -1):  # base -> 2 base -> ... -> image_size (28 px: 7, 14, 28)
            layers += [
                _upsample(channels_at(w, k), channels_at(w, k - 1), cfg.upsample),
                nn.BatchNorm2d(channels_at(w, k - 1)),
                nn.ReLU(),
            ]
        self.up = nn.Sequential(*layers, nn.Conv2d(w, cfg.channels, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], dim=1))
        return self.up(h.view(z.shape[0], -1, self.base, self.base))


def _upsample(channels_in: int, channels_out: int, how: str) -> nn.Module:
    """Double the resolution. Transposed convolutions of stride 2 overlap unevenly and
    leave checkerboards (Odena et al. 2016); resizing first, then convolving, does not."""
    if how == "transposed":
        return nn.ConvTranspose2d(channels_in, channels_out, 4, stride=2, padding=1)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode=how),
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
    )


class Discriminator(nn.Module):
    """images ``(N, C, S, S)``, ``y (N,)`` -> logits ``(N, 1 + n_classes)`` or ``(N, 1)``.

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
        w, n = cfg.d_width or d_width_for(cfg.image_size), halvings(cfg.image_size)
        self.n_classes = k
        self.classifies = cfg.conditioning == "aux"  # class logits after the real/fake one
        layers: list[nn.Module] = []
        into = cfg.channels + (not self.classifies) * k
        for j in range(n):  # S -> S/2 -> ... -> the smallest map (28 px: 14, 7)
            layers += [nn.Conv2d(into, channels_at(w, j), 4, stride=2, padding=1)]
            layers += [nn.LeakyReLU(0.2)]
            into = channels_at(w, j)
        smallest = cfg.image_size // 2**n
        self.features = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(into * smallest**2, outputs[cfg.conditioning])
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
        self.channels = cfg.channels
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg)
        if not 0.0 <= cfg.ema < 1.0:
            raise ValueError(f"model.ema={cfg.ema}: expected a decay in [0, 1), 0 = none")
        # The twin's generator: an average of the generator's recent weights (cfg.ema)
        self.generator_ema: Generator | None = None
        if cfg.ema > 0:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self._d_steps_done = 0
        self.feature_map: FeatureMap | None = None
        if cfg.features is not None:
            fcfg = FeatureConfig(**_tuples(cfg.features))
            self.feature_map = FeatureMap(fcfg, cfg.image_size, cfg.channels)
            # The pooled release: per class, feature sums and image count over the
            # consortium's total image count (fedtwin.features.release_rows); zeros until
            # the hospitals have released them.
            rows = torch.zeros(cfg.n_classes, self.feature_map.dim + 1)
            self.register_buffer("feature_release", rows)

    def feature_target(self) -> torch.Tensor | None:
        """The class means ``(K, D)`` the generator is anchored to, or None before the
        release (or without features)."""
        if self.feature_map is None or not bool((self.feature_release[:, -1] > 0).any()):
            return None
        return class_means(self.feature_release)

    def private_module(self) -> nn.Module:
        return self.discriminator

    def make_optimizers(self) -> tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.lr_d, betas=betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.lr_g, betas=betas)
        return opt_d, [opt_g]

    def _labels(self, n: int, rng: torch.Generator) -> torch.Tensor:
        if self.label_prior is None:
            return torch.randint(0, self.n_classes, (n,), generator=rng)
        return torch.multinomial(self.label_prior, n, replacement=True, generator=rng)

    def train_step(self, private, real, labels, private_opt, other_opts, expected_batch, rng):
        device = real.device
        (opt_g,) = other_opts
        # One generated batch serves both players: two halves with the same labels and
        # different noise (the mode-seeking term compares them). It depends on no real image.
        half = max(1, expected_batch // 2)  # BatchNorm needs 2 images
        z = torch.randn(2 * half, self.cfg.latent_dim, generator=rng).to(device)
        fake_y = self._labels(half, rng).repeat(2).to(device)
        fake = self.generator(z, fake_y)

        # Discriminator. Generated images are data-independent: their gradient is exact.
        params = [p for p in private.parameters() if p.requires_grad]
        with _hooks_off(private):
            loss_fake = self._d_loss(private(fake.detach(), fake_y), fake_y, real=False).mean()
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

        # Generator: learns only through the (already private) discriminator and the
        # already released feature statistics; each step after the first on a new batch.
        with _hooks_off(private):
            for step in range(self.cfg.g_steps):
                if step:
                    z = torch.randn(2 * half, self.cfg.latent_dim, generator=rng).to(device)
                    fake_y = self._labels(half, rng).repeat(2).to(device)
                    fake = self.generator(z, fake_y)
                opt_g.zero_grad(set_to_none=True)
                losses = self._generator_loss(private, fake, fake_y, z)
                losses["loss_g"].backward()
                opt_g.step()
                self.update_ema()
            private_opt.zero_grad(set_to_none=True)
        return {"loss_d": loss_d.item(), **{k: v.item() for k, v in losses.items()}}

    @torch.no_grad()
    def update_ema(self, decay: float | None = None) -> None:
        """Move the averaged generator towards the generator by ``1 - decay`` (default:
        ``cfg.ema``; 0 copies it). BatchNorm's running statistics are copied, not averaged:
        they describe the generator's current activations."""
        if self.generator_ema is None:
            return
        decay = self.cfg.ema if decay is None else decay
        for kept, new in zip(self.generator_ema.parameters(), self.generator.parameters(),
                             strict=True):  # fmt: skip
            kept.lerp_(new, 1.0 - decay)
        for kept, new in zip(self.generator_ema.buffers(), self.generator.buffers(), strict=True):
            kept.copy_(new)

    def _d_loss(self, out: torch.Tensor, y: torch.Tensor, real: bool) -> torch.Tensor:
        """Per-image discriminator loss: real/fake, plus (AC-GAN) the class of real images.

        The class head learns from real images only; generated ones would teach it the
        generator's mistakes. With ``class_balance`` its logits are shifted by the log of
        the hospital's label mix while training, so the unshifted logits (what the
        generator is trained against) carry no hospital's prior.
        """
        target = torch.full((len(out),), float(real), device=out.device)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], target, reduction="none")
        if real and self.discriminator.classifies:
            logits = out[:, 1:]
            if self.cfg.class_balance and self.label_prior is not None:
                logits = logits + self.label_prior.to(logits.device).clamp(min=1e-4).log()
            loss = loss + self.cfg.aux_weight * F.cross_entropy(logits, y, reduction="none")
        return loss

    def _generator_loss(self, private, fake, y, z) -> dict[str, torch.Tensor]:
        """Non-saturating GAN loss, the class loss (AC-GAN), the mode-seeking term (Mao et
        al., 2019) and the feature anchor; ``loss_g`` is their weighted sum.

        ``fake`` is two halves with the same labels and different noise; the mode-seeking
        term grows when two noise vectors give nearly the same image, which is what
        collapse looks like. The anchor is the distance of the generated images' features
        from the released class means. None of this touches real data.
        """
        out = private(fake, y)
        ones = torch.ones(len(fake), device=fake.device)
        loss = F.binary_cross_entropy_with_logits(out[:, 0], ones)
        if self.discriminator.classifies:  # AC-GAN: images D classifies as their label
            loss = loss + self.cfg.aux_weight * F.cross_entropy(out[:, 1:], y)
        if self.cfg.mode_seeking > 0:
            half = len(fake) // 2
            image_gap = (fake[:half] - fake[half:]).abs().mean(dim=(1, 2, 3))
            noise_gap = (z[:half] - z[half:]).abs().mean(dim=1)
            loss = loss + self.cfg.mode_seeking / ((image_gap / noise_gap).mean() + 1e-5)
        losses = {}
        loss = loss + self._smoothness(fake)
        target = self.feature_target()
        if target is not None and self.cfg.anchor > 0:
            anchor = moment_loss(self.feature_map(fake), y, target.to(fake.device))
            loss = loss + self.cfg.anchor * anchor
            losses["loss_anchor"] = anchor
        return {"loss_g": loss, **losses}

    def _smoothness(self, images: torch.Tensor) -> torch.Tensor | float:
        """The smoothness prior's term of G's loss (warm start and GAN rounds alike)."""
        if self.cfg.smoothness <= 0:
            return 0.0
        return self.cfg.smoothness * total_variation(images)

    def warm_start(self, steps: int, rng: torch.Generator, progress: bool = False) -> list[float]:
        """Fit the generator to the released class means (``feature_release``) alone for
        ``steps`` steps: the server's post-processing before DP-GAN training. Classes are
        drawn in proportion to their released counts. Returns the loss every 50 steps."""
        from tqdm import tqdm

        target = self.feature_target()
        if target is None:
            raise RuntimeError("warm_start: no feature statistics released yet")
        counts = self.feature_release[:, -1].clamp(min=0)
        shares = (counts / counts.sum()).clamp(min=1.0 / (10 * self.n_classes))
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.warm_start_lr,
                               betas=(0.5, 0.999))  # fmt: skip
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        n = self.cfg.warm_start_batch * self.n_classes
        self.generator.train()
        trace = []
        for step in tqdm(range(steps), desc="warm start", disable=not progress, leave=False):
            y = torch.multinomial(shares, n, replacement=True, generator=rng)
            z = torch.randn(n, self.cfg.latent_dim, generator=rng)
            images = self.generator(z, y)
            loss = moment_loss(self.feature_map(images), y, target) + self._smoothness(images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if step % 50 == 0 or step == steps - 1:
                trace.append(loss.item())
        self.update_ema(0.0)  # the average starts from the warm-started generator
        return trace

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        generator = self.generator if self.generator_ema is None else self.generator_ema
        was_training = generator.training
        generator.eval()
        z = torch.randn(len(labels), self.cfg.latent_dim, generator=rng)
        out = generator(z.to(labels.device), labels)
        generator.train(was_training)
        return out


def _tuples(fields: dict) -> dict:
    """Config lists (Hydra gives lists) as the tuples a frozen dataclass keeps."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


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
