"""fedtwin.twin: label mixes, generation, the twin directory and its manifest."""

import csv
import json

import numpy as np
import pydicom
import pytest
import torch

from fedtwin.config import class_weights, load_config
from fedtwin.models import build_model
from fedtwin.twin import generate, generate_from_rounds, label_mix, sha256_file, write_twin


def test_label_mix_federation_matches_shares_exactly():
    labels = label_mix(np.array([1214, 3494]), 1000, "federation", seed=0)
    assert np.bincount(labels).tolist() == [258, 742]
    assert not np.all(np.diff(labels) >= 0)  # shuffled


def test_label_mix_balanced_and_bad_mode():
    assert np.bincount(label_mix(np.array([1, 9]), 11, "balanced", 0)).tolist() == [6, 5]
    with pytest.raises(ValueError, match="twin.label_mix"):
        label_mix(np.array([1, 1]), 10, "uniform", 0)


def test_label_mix_over_samples_the_weighted_class():
    """Shares 80 / 20 with the second class weighted 3: 80 / 60 of every 140 images."""
    labels = label_mix(np.array([80, 20]), 1400, "federation", 0, weights=np.array([1.0, 3.0]))
    assert np.bincount(labels).tolist() == [800, 600]
    even = label_mix(np.array([1, 1, 1]), 12, "balanced", 0, weights=np.array([1.0, 1.0, 2.0]))
    assert np.bincount(even).tolist() == [3, 3, 6]


def test_class_weights_are_per_class_in_the_datasets_order():
    cfg = load_config(["data=retinamnist", "+twin.class_weights.grade_4=3.0"])
    assert class_weights(cfg) == [1.0, 1.0, 1.0, 1.0, 3.0]
    assert class_weights(load_config([])) == [1.0, 1.0]


def test_twin_directory_contract(tmp_path):
    model = build_model({"name": "dcgan", "latent_dim": 8, "g_width": 8, "d_width": 8}, 2, 28)
    labels = label_mix(np.array([1, 3]), 12, "federation", 0)
    images = generate(model, labels, seed=0, batch=5)
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    manifest_path = write_twin(
        tmp_path / "twin",
        images,
        labels,
        class_names=["normal", "pneumonia"],
        provenance={"privacy": {"epsilon_per_hospital": {"h0": 1.5, "h1": float("inf")}}},
    )
    twin = tmp_path / "twin"
    npz = np.load(twin / "images.npz")
    assert np.array_equal(npz["train_images"], images)
    assert npz["train_labels"].shape == (12, 1)
    rows = list(csv.DictReader(open(twin / "labels.csv")))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    ds = pydicom.dcmread(twin / "dicom" / rows[3]["file"])
    assert np.array_equal(ds.pixel_array, images[3])
    assert ds.ConversionType == "SYN" and ds.PatientName == "SYNTHETIC"
    manifest = json.loads(manifest_path.read_text())  # strict JSON: inf written as "inf"
    assert manifest["privacy"]["epsilon_per_hospital"]["h1"] == "inf"
    assert len(manifest["files"]) == 12 + 2
    for rel, digest in manifest["files"].items():
        assert sha256_file(twin / rel) == digest


def test_generate_from_rounds_gives_each_generator_an_equal_share():
    small = {"name": "dcgan", "latent_dim": 8, "g_width": 8, "d_width": 8}
    torch.manual_seed(0)
    models = [build_model(small, 2, 28).eval() for _ in range(3)]
    labels = label_mix(np.array([1, 3]), 10, "federation", 0)
    images = generate_from_rounds(models, labels, seed=7)
    assert images.shape == (10, 28, 28)
    shares = [list(range(0, 4)), list(range(4, 7)), list(range(7, 10))]
    for i, (model, idx) in enumerate(zip(models, shares, strict=True)):
        assert np.array_equal(images[idx], generate(model, labels[idx], seed=7 + i)), i
    assert not np.array_equal(images[:4], generate(models[1], labels[:4], seed=7))
    with pytest.raises(ValueError, match="no generator"):
        generate_from_rounds([], labels, seed=0)
