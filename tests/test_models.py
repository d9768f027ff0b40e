"""fedtwin.models: shapes, Opacus compatibility of the private module, config errors."""

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
