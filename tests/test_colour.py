"""Colour images and many classes end to end below the federation: RetinaMNIST (RGB fundus
photographs, 5 grades) loads in colour, goes through hospital DICOM archives and back to
the same pixels, trains each generator with DP and samples colour images; and both
generators at 64 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedtwin import data, dicom
from fedtwin.config import load_config
from fedtwin.data import DataError
from fedtwin.ingest import ingest
from fedtwin.models import build_model, model_from_config
from fedtwin.privacy import plan_privacy
from fedtwin.tensors import to_tensor, to_uint8
from fedtwin.training import local_round
from fedtwin.twin import generate


def test_retinamnist_loads_in_colour_and_in_grey_on_request(retina_path):
    colour = data.load_npz(retina_path, "train", channels=3)
    assert colour.images.shape == (1080, 28, 28, 3) and set(np.unique(colour.labels)) == {
        0, 1, 2, 3, 4
    }  # fmt: skip
    grey = data.load_npz(retina_path, "train", channels=1)
    assert grey.images.shape == (1080, 28, 28)
    luma = colour.images.astype(float) @ data.LUMA_WEIGHTS
    assert np.abs(grey.images - luma).max() <= 0.5 + 1e-9
    assert np.array_equal(data.load_npz(retina_path, "train", channels=None).images, colour.images)
    bigger = data.resize_images(colour.images[:4], 64)
    assert bigger.shape == (4, 64, 64, 3)
    # each channel resized as a grey image would be
    for c in range(3):
        alone = data.resize_images(np.ascontiguousarray(colour.images[:4, ..., c]), 64)
        assert np.array_equal(bigger[..., c], alone)


def test_grey_data_for_a_colour_config_is_a_clear_error(data_path):
    with pytest.raises(DataError, match="data.channels=3"):
        data.load_npz(data_path, "train", channels=3)


def test_tensors_round_trip_colour():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8)
    x = to_tensor(images)
    assert x.shape == (5, 3, 28, 28) and -1 <= float(x.min()) and float(x.max()) <= 1
    assert np.array_equal(to_uint8(x), images)
    assert np.array_equal(to_uint8(to_tensor(images[..., 0])), images[..., 0])


def test_a_colour_archive_round_trips_through_hospitals_make_and_ingest(tmp_path, retina_path):
    with np.load(retina_path) as npz:
        images, labels = npz["train_images"][:150], npz["train_labels"][:150]
    source = tmp_path / "source.npz"
    np.savez(source, train_images=images, train_labels=labels)
    dirs = dicom.make_hospital_archives(
        source, 2, "dirichlet", 0.5, 0.25, seed=3, out=tmp_path / "out", progress=False
    )
    expected = data.make_hospitals(
        data.load_npz(source, channels=3), 2, "dirichlet", 0.5, 0.25, seed=3
    )
    for hospital_dir, h in zip(dirs, expected, strict=True):
        first = sorted((hospital_dir / "dicom").glob("*.dcm"))[0]
        ds = pydicom.dcmread(first)
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert np.array_equal(ds.pixel_array, images[h.rows[0]])
        result = ingest(hospital_dir, image_size=28, n_classes=5, channels=3)
        assert result.skipped == [] and result.used == len(h.rows)
        assert np.array_equal(result.data.images, images[h.rows])
        assert np.array_equal(result.data.labels, labels[h.rows, 0])
        # the same colour archive read for a grey dataset: luma, documented
        grey = ingest(hospital_dir, image_size=28, n_classes=5, channels=1)
        assert grey.data.images.shape == (len(h.rows), 28, 28) and grey.skipped == []
    info = json.loads((dirs[0] / "hospital.json").read_text())
    assert info["images"] == len(expected[0].rows)


def test_a_grey_file_in_a_colour_archive_is_skipped_with_its_reason(tmp_path):
    rng = np.random.default_rng(2)
    archive = tmp_path / "archive"
    dicom.write_dicom(
        archive / "dicom" / "rgb.dcm",
        rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),
        label=1,
        synthetic=False,
    )
    dicom.write_dicom(
        archive / "dicom" / "grey.dcm",
        rng.integers(0, 256, (28, 28), dtype=np.uint8),
        label=0,
        synthetic=False,
    )
    (archive / "labels.csv").write_text("file,label\nrgb.dcm,1\ngrey.dcm,0\n")
    result = ingest(archive, image_size=28, n_classes=2, channels=3)
    assert result.used == 1 and result.data.images.shape == (1, 28, 28, 3)
    [(name, reason)] = result.skipped
    assert name == "grey.dcm" and "data.channels=3" in reason


TINY_MODELS = {
    "dcgan": {"name": "dcgan", "latent_dim": 16, "g_width": 8, "d_width": 8},
    "ddpm": {"name": "ddpm", "width": 8, "sample_steps": 4},
}


@pytest.mark.parametrize(
    ("name", "channels", "size"),
    [(n, c, s) for n in TINY_MODELS for c, s in [(3, 28), (1, 64)]] + [("dcgan", 1, 128)],
)
def test_each_generator_trains_with_dp_and_samples_at_its_shape(
    name, channels, size, retina_path, small_real
):
    """A DP round on real images (RetinaMNIST in colour at 28 px; PneumoniaMNIST upsampled
    to 64 px, and to 128 px for the DCGAN), then a twin of the configured shape."""
    n = 120
    if channels == 3:
        real = data.load_npz(retina_path, "train", channels=3)
        images, labels, k = real.images[:n], real.labels[:n], 5
    else:
        images, labels, k = data.resize_images(small_real[0][:n], size), small_real[1][:n], 2
    shape = images.shape
    model = build_model(TINY_MODELS[name], k, size, channels)
    plan = plan_privacy(
        enabled=True,
        epsilon=10.0,
        delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
        n_train=n,
        batch_size=32,
        total_steps=1,
        label_noise=10.0,
    )
    result = local_round(model, images, labels, plan, steps=1, batch_size=32, history=[], seed=0)
    assert 0 < result.epsilon <= 10.0
    twin = generate(model, np.arange(k).repeat(2), seed=0)
    assert twin.shape == (2 * k, *shape[1:]) and twin.dtype == np.uint8
    assert images.shape[1:3] == (size, size)


def test_the_colour_dataset_config_builds_a_colour_generator_with_features():
    cfg = load_config(["data=retinamnist"])
    assert cfg["data"]["channels"] == 3 and len(cfg["data"]["classes"]) == 5
    model = model_from_config(cfg)
    assert model.channels == 3 and model.feature_map is not None
    twin = generate(model, np.arange(5), seed=0)
    assert twin.shape == (5, 28, 28, 3)


def test_a_colour_twin_is_written_as_rgb_dicoms_and_read_as_colour_tensors(tmp_path: Path):
    from fedtwin.twin import TwinDataset, write_twin

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    names = ["a", "b", "c"]
    write_twin(tmp_path / "twin", images, np.arange(6) % 3, class_names=names, provenance={})
    ds = pydicom.dcmread(sorted((tmp_path / "twin" / "dicom").glob("*.dcm"))[2])
    assert ds.PhotometricInterpretation == "RGB" and np.array_equal(ds.pixel_array, images[2])
    x, y = TwinDataset(tmp_path / "twin", verify=False)[2]
    assert x.shape == (3, 28, 28) and y == 2
    assert np.allclose(x.permute(1, 2, 0).numpy() * 255, images[2])


def test_five_class_colour_utility_and_audit_pool_to_what_sklearn_gives(retina_path):
    """RetinaMNIST split over three hospitals: the pooled macro one-vs-rest AUC and accuracy
    of a classifier trained on colour images equal sklearn's on all holdouts at once, and
    the audit runs on colour images (a copied training image is a near copy)."""
    from scipy.spatial.distance import cdist
    from sklearn.metrics import accuracy_score, roc_auc_score

    from fedtwin import audit, audit_pool
    from fedtwin.metrics import predict_log_odds, predict_proba, train_classifier
    from fedtwin.utility import pool_utility, site_utility

    train = data.load_npz(retina_path, "train", channels=3)
    hospitals = data.make_hospitals(train, 3, "iid", 0.5, 0.3, seed=0)
    clf = train_classifier(
        hospitals[0].train.images,
        hospitals[0].train.labels,
        5,
        epochs=8,
        batch_size=64,
        lr=1e-3,
        seed=0,
    )  # fmt: skip  (fewer epochs leave a class's log-odds within one 0.02 bin: ties)
    assert clf.body[0].in_channels == 3
    images = np.concatenate([h.holdout.images for h in hospitals])
    labels = np.concatenate([h.holdout.labels for h in hospitals])
    pooled = pool_utility(
        {h.name: site_utility(clf, h.holdout.images, h.holdout.labels) for h in hospitals}
    )
    probs = predict_proba(clf, images)
    assert pooled["acc"] == pytest.approx(accuracy_score(labels, probs.argmax(1)), abs=1e-12)
    macro = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert pooled["auc"] == pytest.approx(macro, abs=0.005)
    assert predict_log_odds(clf, images).shape == (len(labels), 5)

    cfg = load_config(["data=retinamnist"])["audit"]
    h = hospitals[1]
    twin = np.concatenate([h.train.images[:10], hospitals[2].holdout.images[:30]])
    site = audit.site_audit(twin, h.train.images, h.holdout.images, cfg)
    assert site["copies"]["near_copies"] >= 10  # the ten copied training images
    pooled_audit = audit_pool.pool({h.name: site}, cfg, 28)
    near = cdist(twin.reshape(40, -1) / 255.0, h.train.images.reshape(len(h.train), -1) / 255.0)
    assert np.sum(near.min(1) == 0) == 10
    assert pooled_audit["ssim"]["twin_quantiles"]["0.99"] > 0.99  # the copies, SSIM 1
