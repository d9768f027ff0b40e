"""fedtwin.features: the feature map, the noisy release, pooling and the moment loss."""

import numpy as np
import pytest
import torch

from fedtwin.features import (
    FeatureConfig,
    FeatureMap,
    class_means,
    embed,
    moment_loss,
    noisy_feature_sums,
    release_rows,
)
from fedtwin.models import build_model

CONFIG = FeatureConfig(features=240, scales=(1, 2, 4), bandwidth=0.33, seed=0)


def test_every_feature_vector_has_norm_one_so_the_release_has_sensitivity_one(small_real):
    fmap = FeatureMap(CONFIG, 28)
    phi = embed(fmap, small_real[0][:50])
    assert phi.shape == (50, 240)
    assert torch.allclose(phi.norm(dim=1), torch.ones(50), atol=1e-5)
    # the map is public and fixed: the same seed gives the same features anywhere
    assert torch.equal(phi, embed(FeatureMap(CONFIG, 28), small_real[0][:50]))


def test_with_the_patch_block_no_image_has_norm_above_one(small_real):
    fmap = FeatureMap(FeatureConfig(features=240, patch=4, patch_stride=2, patch_features=64), 28)
    noise = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    flat = np.full((2, 28, 28), 128, dtype=np.uint8)  # every patch alike: the largest norm
    phi = embed(fmap, np.concatenate([small_real[0][:50], noise, flat]))
    assert phi.shape == (102, 240 + 64)
    assert (phi.norm(dim=1) <= 1 + 1e-5).all()
    assert phi[-1].norm() == pytest.approx(1.0, abs=1e-5)


def test_noise_free_sums_are_the_class_sums_and_noise_has_the_planned_std(small_real):
    images, labels = small_real
    fmap = FeatureMap(CONFIG, 28)
    exact = noisy_feature_sums(fmap, images, labels, 3, noise_multiplier=0.0)
    phi = embed(fmap, images).double().numpy()
    assert np.allclose(exact[1], phi[labels == 1].sum(0))
    assert np.allclose(exact[2], 0.0)  # no image of class 2
    noisy = noisy_feature_sums(fmap, images, labels, 3, noise_multiplier=2.0)
    assert np.std(noisy - exact) == pytest.approx(2.0, rel=0.1)


def test_averaging_hospitals_rows_by_size_gives_the_pooled_class_means(small_real):
    """FedAvg weights each hospital by its image count: the average of release_rows is the
    consortium's sums over its counts, whatever the split."""
    images, labels = small_real
    fmap = FeatureMap(CONFIG, 28)
    parts = [slice(0, 40), slice(40, 300)]
    rows, sizes = [], []
    for part in parts:
        sums = noisy_feature_sums(fmap, images[part], labels[part], 2, 0.0)
        counts = np.bincount(labels[part], minlength=2)
        rows.append(release_rows(sums, counts, len(labels[part])))
        sizes.append(len(labels[part]))
    pooled = sum(r * n for r, n in zip(rows, sizes, strict=True)) / sum(sizes)
    means = class_means(torch.as_tensor(pooled)).numpy()
    phi = embed(fmap, images).numpy()
    for c in (0, 1):
        assert np.allclose(means[c], phi[labels == c].mean(0), atol=1e-5)


def test_moment_loss_is_near_zero_for_the_target_distribution_and_punishes_collapse():
    torch.manual_seed(0)
    target_rows = torch.nn.functional.normalize(torch.randn(4000, 16), dim=1)
    target = target_rows.mean(0, keepdim=True)
    fresh = torch.nn.functional.normalize(torch.randn(500, 16), dim=1)
    labels = torch.zeros(500, dtype=torch.long)
    assert abs(moment_loss(fresh, labels, target).item()) < 0.01  # unbiased: no i = j terms
    collapsed = fresh[:1].repeat(500, 1)
    assert moment_loss(collapsed, labels, target).item() > 0.5


def test_warm_start_fits_the_generator_to_the_released_means(small_real):
    images, labels = small_real
    model = build_model({"name": "dcgan", "latent_dim": 16, "g_width": 8, "d_width": 8,
                         "features": {"features": 240}, "warm_start_batch": 32}, 2, 28)  # fmt: skip
    assert model.feature_target() is None  # nothing released yet
    sums = noisy_feature_sums(model.feature_map, images, labels, 2, 0.0)
    rows = release_rows(sums, np.bincount(labels, minlength=2), len(labels))
    model.feature_release.copy_(torch.as_tensor(rows))
    trace = model.warm_start(60, torch.Generator().manual_seed(0))
    assert trace[-1] < 0.5 * trace[0]
    # the release travels with the weights: every hospital and checkpoint has it
    assert "feature_release" in model.state_dict()


def test_the_smoothness_prior_makes_the_warm_started_images_smoother(small_real):
    """The total-variation weight touches no real image; it must still do what it says:
    the same warm start with it gives images whose neighbouring pixels differ less."""
    from fedtwin.models.dcgan import total_variation

    images, labels = small_real
    variation = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = build_model({"name": "dcgan", "latent_dim": 16, "g_width": 8, "d_width": 8,
                             "features": {"features": 240}, "warm_start_batch": 32,
                             "smoothness": weight}, 2, 28)  # fmt: skip
        sums = noisy_feature_sums(model.feature_map, images, labels, 2, 0.0)
        rows = release_rows(sums, np.bincount(labels, minlength=2), len(labels))
        model.feature_release.copy_(torch.as_tensor(rows))
        model.warm_start(60, torch.Generator().manual_seed(0))
        y = torch.tensor([0, 1] * 32)
        variation[weight] = total_variation(model.sample(y, torch.Generator().manual_seed(1)))
    assert variation[1.0] < 0.7 * variation[0.0], variation
