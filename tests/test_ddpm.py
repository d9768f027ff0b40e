"""The diffusion generator: Opacus accepts it, noise multiplicity averages each image's
copies before clipping, large logical batches split into physical ones keep the plan's
accounting, and sampling gives images in range for the labels asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.validators import ModuleValidator

from fedtwin.config import load_config
from fedtwin.models import build_model
from fedtwin.models.ddpm import average_multiplicity
from fedtwin.privacy import plan_from_config
from fedtwin.tensors import to_tensor
from fedtwin.training import local_round


def small_ddpm(**override):
    cfg = load_config(["model=ddpm", "model.width=8"])["model"] | override
    return build_model(cfg, 2, 28)


def test_unet_is_opacus_compatible():
    model = small_ddpm()
    assert ModuleValidator.validate(model.unet, strict=False) == []
    assert not any("alpha_bar" in k for k in model.state_dict())  # only weights travel


def test_noise_multiplicity_averages_an_images_copies_before_clipping(small_real):
    images, labels = small_real
    model = small_ddpm(noise_multiplicity=3)
    k, n = 3, 4
    x, y = to_tensor(images[:n]), torch.as_tensor(labels[:n])
    wrapped = GradSampleModule(model.unet)
    t = torch.randint(0, 1000, (n * k,), generator=torch.Generator().manual_seed(0))
    noise = torch.randn(n * k, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    x0, yk = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
    ab = model.alpha_bar[t][:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    per_row = (wrapped(xt, t, yk) - noise).pow(2).mean(dim=(1, 2, 3))
    (per_row.sum() / len(per_row)).backward()
    average_multiplicity(wrapped, k)
    per_image = [p.grad_sample.clone() for p in wrapped.parameters()]
    wrapped.disable_hooks()
    # reference: the gradient of image i's mean loss over its own k copies, one at a time
    for i in (0, 3):
        model.unet.zero_grad()
        rows = slice(i * k, (i + 1) * k)
        ref = (model.unet(xt[rows], t[rows], yk[rows]) - noise[rows]).pow(2).mean()
        grads = torch.autograd.grad(ref, list(model.unet.parameters()))
        for mine, g in zip(per_image, grads, strict=True):
            assert mine.shape[0] == n
            torch.testing.assert_close(mine[i], g, rtol=1e-4, atol=1e-6)


def test_logical_batches_split_into_physical_ones_keep_the_accounting(small_real):
    images, labels = small_real
    model = small_ddpm(noise_multiplicity=2, max_physical_batch=8)
    privacy = load_config()["privacy"]
    plan = plan_from_config(privacy, n_train=len(images), batch_size=40, total_steps=3)
    result = local_round(model, images, labels, plan, steps=3, batch_size=40, history=[], seed=0)
    assert result.steps == 3
    assert [h[2] for h in result.history] == [3]  # three logical steps, not ~15 physical
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert result.epsilon == pytest.approx(acc.get_epsilon(delta=plan.delta), rel=1e-9)
    assert all(np.isfinite(w).all() for w in result.weights.values())


def test_sampling_gives_images_in_range_reproducibly():
    model = small_ddpm(sample_steps=4)
    labels = torch.tensor([0, 1, 1, 0])
    a = model.sample(labels, torch.Generator().manual_seed(3))
    b = model.sample(labels, torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b)
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    unguided = small_ddpm(sample_steps=4, guidance=0.0)
    unguided.load_state_dict(model.state_dict())
    assert not torch.equal(unguided.sample(labels, torch.Generator().manual_seed(3)), a)


def test_unknown_model_setting_is_a_clear_error():
    with pytest.raises(ValueError, match="model \\(ddpm\\)"):
        small_ddpm(widht=8)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_samples_follow_their_label_the_way_the_training_images_do(guidance):
    """Class 1 is bright and class 0 dark in training: without DP noise, a few hundred
    steps make class-1 samples the brighter ones, with and without guidance. (The twin's
    below-chance TSTR at ε = 10 on two CPU cores is a class difference too weak to learn
    in the steps that fit, whose sign is then chance; not labels or guidance reversed.)"""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    images = np.where(labels[:, None, None] == 1, 190, 60) + rng.integers(-20, 20, (256, 28, 28))
    images = images.clip(0, 255).astype(np.uint8)
    torch.manual_seed(0)
    model = small_ddpm(noise_multiplicity=1, sample_steps=10, guidance=guidance, lr=3e-3)
    privacy = load_config()["privacy"]
    plan = plan_from_config(privacy, n_train=256, batch_size=32, total_steps=150, enabled=False)
    local_round(model, images, labels, plan, steps=150, batch_size=32, history=[], seed=0)
    asked = torch.tensor([0] * 16 + [1] * 16)
    x = model.sample(asked, torch.Generator().manual_seed(0))
    dark, bright = x[:16].mean().item(), x[16:].mean().item()
    assert bright - dark > 0.1, (dark, bright)  # the real gap is 1.0 in [-1, 1]; a reversed
    # label or guidance would give a gap below 0


class _Oracle(torch.nn.Module):
    """The exact denoiser of a data set holding one image ``x0``: what the UNet would
    predict if it were perfect, as noise (``eps``) or velocity (``v``)."""

    def __init__(self, x0: torch.Tensor, alpha_bar: torch.Tensor, prediction: str):
        super().__init__()
        self.x0, self.alpha_bar, self.prediction = x0, alpha_bar, prediction

    def forward(self, x, t, y):
        ab = self.alpha_bar[t][:, None, None, None]
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * self.x0


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_sampler_with_a_perfect_denoiser_returns_the_data(prediction):
    """DDIM from pure noise lands on the one training image when the network is exact:
    the sampler inverts the training target of either parametrization."""
    model = small_ddpm(prediction=prediction, sample_steps=10)
    x0 = torch.linspace(-0.9, 0.9, 28 * 28).view(1, 1, 28, 28)
    model.unet = _Oracle(x0, model.alpha_bar, prediction)
    x = model.sample(torch.tensor([0, 1, 1]), torch.Generator().manual_seed(0))
    assert torch.allclose(x, x0.expand(3, -1, -1, -1), atol=1e-3)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="model.prediction"):
        small_ddpm(prediction="x0")
