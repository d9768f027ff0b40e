"""Class-conditional denoising diffusion (DDPM) for small grayscale images, trained with
DP-SGD as in DPDM (Dockhorn et al. 2022).

- The denoiser is a small UNet with GroupNorm (no BatchNorm: Opacus needs per-sample
  gradients). It sees real images, so all of it is the private module.
- Labels enter as an embedding added to the time embedding; an extra "no label" index
  trains the unconditional model too (label dropout), for classifier-free guidance.
- **Noise multiplicity.** Each real image is noised at ``noise_multiplicity`` random
  levels in the same step; the per-sample gradients of those copies are averaged into the
  image's one gradient *before* clipping. The image still contributes one clipped
  gradient, so this costs no privacy, and the averaged gradient is far less noisy.
- **What the UNet predicts**: the noise ``eps`` (Ho et al. 2020; the default) or the
  velocity ``v = sqrt(ab) eps - sqrt(1-ab) x0`` (Salimans & Ho 2022), whose image estimate
  ``sqrt(ab) x - sqrt(1-ab) v`` never divides the model's error by ``sqrt(ab)``. Under DP
  at the same budget ``v`` gave smoother but less useful twins (docs/generators.md).
- Twins are sampled with DDIM (deterministic, ``sample_steps`` steps instead of
  ``timesteps``) and guidance weight ``guidance``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedtwin.models.base import TwinGenerator, private_step


@dataclass(frozen=True)
class DDPMConfig:
    n_classes: int = 2
    image_size: int = 28
    channels: int = 1  # 3 for colour
    width: int = 32  # UNet base channels (2x at the lower resolutions)
    timesteps: int = 1000  # training noise levels (linear beta schedule)
    sample_steps: int = 50  # DDIM steps when generating the twin
    guidance: float = 1.0  # classifier-free guidance weight w: (1 + w) cond - w uncond
    p_uncond: float = 0.1  # share of training rows whose label is dropped
    noise_multiplicity: int = 4  # noise levels per image, averaged before clipping
    prediction: str = "eps"  # what the UNet predicts: "eps" (the noise) or "v" (velocity)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    max_physical_batch: int = 256  # images per physical batch (Opacus BatchMemoryManager)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``(N,)`` -> ``(N, dim)`` (Vaswani et al.; Ho et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(min(8, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(e))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


def check_image_size(image_size: int) -> None:
    """ValueError unless the UNet's two halvings divide ``image_size``."""
    if image_size % 4:
        raise ValueError(
            f"data.image_size={image_size}: the diffusion UNet halves it twice, so it must be "
            "a multiple of 4 (e.g. 28, 32, 64, 128, 224)"
        )


class UNet(nn.Module):
    """``x (N, C, S, S)``, ``t (N,)``, ``y (N,)`` -> predicted noise ``(N, C, S, S)``.

    Two downsamplings (S -> S/2 -> S/4) with skip connections; ``y == n_classes`` is the
    "no label" index of classifier-free guidance.
    """

    def __init__(self, cfg: DDPMConfig):
        super().__init__()
        check_image_size(cfg.image_size)
        w, e = cfg.width, 4 * cfg.width
        self.width = w
        self.time = nn.Sequential(nn.Linear(w, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(cfg.n_classes + 1, e)
        self.stem = nn.Conv2d(cfg.channels, w, 3, padding=1)
        self.down1 = ResBlock(w, w, e)
        self.pool1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)  # S -> S/2
        self.down2 = ResBlock(2 * w, 2 * w, e)
        self.pool2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)  # S/2 -> S/4
        self.mid = ResBlock(2 * w, 2 * w, e)
        self.up2 = ResBlock(4 * w, 2 * w, e)
        self.up1 = ResBlock(3 * w, w, e)
        self.out_norm = nn.GroupNorm(min(8, w), w)
        self.out = nn.Conv2d(w, cfg.channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self.time(timestep_embedding(t, self.width)) + self.label(y)
        h1 = self.down1(self.stem(x), e)
        h2 = self.down2(self.pool1(h1), e)
        m = self.mid(self.pool2(h2), e)
        u = self.up2(torch.cat([F.interpolate(m, scale_factor=2.0), h2], dim=1), e)
        u = self.up1(torch.cat([F.interpolate(u, scale_factor=2.0), h1], dim=1), e)
        return self.out(F.silu(self.out_norm(u)))


class DDPM(TwinGenerator):
    """The denoiser and its noise schedule; the denoiser is exchanged and DP-trained."""

    name = "ddpm"

    def __init__(self, cfg: DDPMConfig):
        super().__init__()
        if cfg.prediction not in ("v", "eps"):
            raise ValueError(f'model.prediction must be "v" or "eps", got {cfg.prediction!r}')
        self.cfg = cfg
        self.n_classes = cfg.n_classes
        self.image_size = cfg.image_size
        self.channels = cfg.channels
        self.max_physical_batch = cfg.max_physical_batch
        self.unet = UNet(cfg)
        betas = torch.linspace(1e-4, 0.02, cfg.timesteps, dtype=torch.float64)
        # not persistent: the schedule follows from the config, only weights are exchanged
        alpha_bar = torch.cumprod(1.0 - betas, 0).float()
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)

    def private_module(self) -> nn.Module:
        return self.unet

    def make_optimizers(self) -> tuple[torch.optim.Optimizer, list[torch.optim.Optimizer]]:
        betas = (self.cfg.beta1, self.cfg.beta2)
        return torch.optim.Adam(self.unet.parameters(), lr=self.cfg.lr, betas=betas), []

    def train_step(self, private, real, labels, private_opt, other_opts, expected_batch, rng):
        k, device = self.cfg.noise_multiplicity, real.device
        x0 = real.repeat_interleave(k, dim=0)
        y = labels.repeat_interleave(k, dim=0)
        rows = len(x0)
        t = torch.randint(0, self.cfg.timesteps, (rows,), generator=rng).to(device)
        noise = torch.randn(x0.shape, generator=rng).to(device)
        dropped = (torch.rand(rows, generator=rng) < self.cfg.p_uncond).to(device)
        y = torch.where(dropped, torch.full_like(y, self.n_classes), y)
        ab = self.alpha_bar.to(device)[t][:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise

        target = noise if self.cfg.prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0

        private_opt.zero_grad(set_to_none=True)
        per_row = (private(xt, t, y) - target).pow(2).mean(dim=(1, 2, 3))
        (per_row.sum() / max(1, rows)).backward()  # an empty Poisson batch gives 0, not NaN
        average_multiplicity(private, k)
        private_step(private_opt, {})
        return {"loss": per_row.mean().item() if rows else 0.0}

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """DDIM (eta = 0) in ``sample_steps`` steps with classifier-free guidance."""
        cfg, device = self.cfg, labels.device
        was_training = self.unet.training
        self.unet.eval()
        n = len(labels)
        x = torch.randn(n, cfg.channels, cfg.image_size, cfg.image_size, generator=rng)
        x = x.to(device)
        ab = self.alpha_bar.to(device)
        steps = torch.linspace(cfg.timesteps - 1, 0, cfg.sample_steps).round().long().tolist()
        null = torch.full_like(labels, self.n_classes)
        for i, t in enumerate(steps):
            tt = torch.full((n,), t, device=device, dtype=torch.long)
            if cfg.guidance:
                both = self.unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
                cond, uncond = both[:n], both[n:]
                out = (1 + cfg.guidance) * cond - cfg.guidance * uncond
            else:
                out = self.unet(x, tt, labels)
            a, a_next = ab[t], (ab[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0))
            if cfg.prediction == "eps":
                x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
            else:
                x0 = a.sqrt() * x - (1 - a).sqrt() * out
            x0 = x0.clamp(-1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clamped x0
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        self.unet.train(was_training)
        return x.clamp(-1, 1)


def average_multiplicity(module: nn.Module, k: int) -> None:
    """Turn per-row gradients of ``k`` noised copies per image into one per image.

    Opacus computed a per-sample gradient for every row of the batch (``B * k`` rows, the
    ``k`` copies of an image adjacent); averaging each image's ``k`` rows before the
    optimizer clips makes the image's contribution one clipped gradient, as DP-SGD's
    accounting assumes. Without DP (no per-sample gradients) there is nothing to do.
    """
    if k == 1:
        return
    for p in module.parameters():
        g = getattr(p, "grad_sample", None)
        if isinstance(g, torch.Tensor):
            p.grad_sample = g.view(g.shape[0] // k, k, *g.shape[1:]).mean(dim=1)
        elif g is not None:
            raise RuntimeError("per-sample gradients of several backward passes: one per step")
