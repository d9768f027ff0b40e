"""fedtwin.models: shapes, Opacus compatibility of the private module, config errors."""

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedtwin.models import DCGAN, build_model


def model(**kw) -> DCGAN:
    return build_model({"name": "dcgan", "latent_dim": 16, "g_width": 8, "d_width": 8, **kw}, 3, 28)


def test_sample_shape_and_range():
    m = model()
    x = m.sample(torch.tensor([0, 1, 2, 2]), torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1


def test_discriminator_is_valid_for_opacus():
    assert ModuleValidator.validate(model().private_module(), strict=False) == []


def test_sampling_is_deterministic_given_seed():
    m = model()
    y = torch.tensor([0, 1, 2])
    a = m.sample(y, torch.Generator().manual_seed(3))
    b = m.sample(y, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_unknown_model_names_the_field():
    with pytest.raises(ValueError, match="model.name"):
        build_model({"name": "vae"}, 2, 28)


def test_image_size_must_fit_the_architecture():
    with pytest.raises(ValueError, match="image_size"):
        build_model({"name": "dcgan"}, 2, 30)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model({"name": "dcgan"}, 2, 36)  # 9 px after two halvings: needs three


@pytest.mark.parametrize(
    "size, halved, d_width", [(28, 2, 32), (32, 2, 32), (64, 3, 24), (128, 4, 16), (224, 5, 16)]
)
def test_the_dcgan_deepens_with_the_image_size(size, halved, d_width):
    """Each halving is one stride-2 stage: the generator starts and the discriminator ends
    at 8 px or less whatever the size, and the discriminator's default width narrows."""
    from fedtwin.models.dcgan import halvings

    m = build_model({"name": "dcgan", "latent_dim": 8, "g_width": 4}, 2, size)
    assert halvings(size) == halved and m.generator.base == size // 2**halved <= 8
    convs = [c for c in m.discriminator.features if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == halved and convs[0].out_channels == d_width
    assert convs[-1].out_channels == d_width * min(2 ** (halved - 1), 8)
    x = m.sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, size, size)
    assert m.private_module()(x, torch.tensor([0, 1])).shape == (2, 3)
    assert ModuleValidator.validate(m.private_module(), strict=False) == []


@pytest.mark.parametrize("conditioning, width", [("planes", 1), ("aux", 1 + 3)])
def test_discriminator_outputs_a_logit_and_with_aux_the_class_logits(conditioning, width):
    m = model(conditioning=conditioning)
    assert ModuleValidator.validate(m.private_module(), strict=False) == []
    out = m.private_module()(torch.zeros(5, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == (5, width)


def test_unknown_conditioning_names_the_field():
    with pytest.raises(ValueError, match="model.conditioning"):
        model(conditioning="text")


def test_the_discriminator_learns_the_class_of_real_images():
    """AC-GAN: D's class head is trained on real images (here: dark vs bright squares),
    so after a few steps it tells the classes apart; the generator is pushed towards it."""
    from fedtwin.privacy import plan_privacy
    from fedtwin.training import local_round

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 256)
    images = np.where(labels[:, None, None] == 1, 200, 30).astype(np.uint8)
    images = np.broadcast_to(images, (256, 28, 28)).copy()
    images[:, :4] = rng.integers(0, 255, (256, 4, 28), dtype=np.uint8)  # some clutter
    m = model(conditioning="aux", lr_d=0.01)  # classes 0 and 1 of 3 present
    plan = plan_privacy(enabled=False, epsilon=1.0, delta=1e-5, max_grad_norm=1.0,
                        accountant="rdp", n_train=256, batch_size=32, total_steps=30,
                        label_noise=0.0)  # fmt: skip
    result = local_round(m, images, labels, plan, steps=30, batch_size=32, history=[], seed=0)
    assert "loss_g" in result.losses
    x = torch.tensor(images, dtype=torch.float32).div(127.5).sub(1).unsqueeze(1)
    with torch.no_grad():
        predicted = m.private_module()(x, torch.tensor(labels))[:, 1:].argmax(1).numpy()
    assert (predicted == labels).mean() > 0.95


def test_total_variation_of_constant_and_checkerboard_images():
    from fedtwin.models.dcgan import total_variation

    assert total_variation(torch.full((2, 1, 8, 8), 0.3)).item() == 0.0
    board = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # -1, +1
    assert total_variation(board.expand(2, 1, 8, 8)).item() == pytest.approx(4.0)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "transposed"])
def test_every_upsampling_gives_images_of_the_configured_size(upsample):
    x = model(upsample=upsample).sample(torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 28, 28)


def test_unknown_upsampling_names_the_field():
    with pytest.raises(ValueError, match="model.upsample"):
        model(upsample="bicubic")


@pytest.mark.parametrize("g_steps", [1, 3])
def test_the_generator_takes_g_steps_per_discriminator_step(g_steps):
    """model.g_steps: generator updates after each DP step of D, on new noise; D's private
    step is taken once either way."""
    m = model(g_steps=g_steps)
    opt_d, [opt_g] = m.make_optimizers()
    images, labels = torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    before = [p.detach().clone() for p in m.discriminator.parameters()]
    m.train_step(m.discriminator, images, labels, opt_d, [opt_g], 8, torch.Generator())
    assert opt_g.state[next(m.generator.parameters())]["step"] == g_steps
    assert opt_d.state[next(m.discriminator.parameters())]["step"] == 1
    after = m.discriminator.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_without_ema_the_twin_comes_from_the_generator_and_nothing_extra_is_exchanged():
    m = model()
    assert m.generator_ema is None
    assert not any(k.startswith("generator_ema") for k in m.state_dict())


def test_the_ema_generator_trails_the_generator_and_makes_the_twin():
    """model.ema: after each generator step the average moves 1 - ema of the way to the
    generator; it is exchanged with the weights, and sample() draws from it."""
    m = model(ema=0.75)
    assert any(k.startswith("generator_ema.") for k in m.state_dict())
    assert all(not p.requires_grad for p in m.generator_ema.parameters())
    m.update_ema(0.0)  # as after the warm start: the average is the generator
    start = [p.detach().clone() for p in m.generator.parameters()]
    opt_d, [opt_g] = m.make_optimizers()
    images, labels = torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    m.train_step(m.discriminator, images, labels, opt_d, [opt_g], 8, torch.Generator())
    for old, new, avg in zip(start, m.generator.parameters(), m.generator_ema.parameters(),
                             strict=True):  # fmt: skip
        torch.testing.assert_close(avg, 0.75 * old + 0.25 * new.detach())
    moved = [p for p, q in zip(start, m.generator.parameters(), strict=True)
             if not torch.equal(p, q)]  # fmt: skip
    assert moved  # the step changed the generator, so the two differ now
    y = torch.tensor([0, 1, 2])
    from_ema = m.sample(y, torch.Generator().manual_seed(1))
    m.update_ema(0.0)
    assert not torch.equal(from_ema, m.sample(y, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("ema", [-0.1, 1.0])
def test_an_ema_decay_outside_0_1_names_the_field(ema):
    with pytest.raises(ValueError, match="model.ema"):
        model(ema=ema)
