"""Tests for fedtwin.dicom: writing DICOM and hospital archives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from fedtwin import data, dicom
from fedtwin.cli import main
from fedtwin.data import Split
from fedtwin.ingest import ingest

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist_28_trainval.npz"


# --- write_dicom ------------------------------------------------------------------------


def test_write_dicom_synthetic_is_valid_and_marked(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    path = dicom.write_dicom(tmp_path / "a.dcm", image, label=1, synthetic=True, uid_source="a")
    ds = pydicom.dcmread(path)  # no force: a proper Part-10 file
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == SecondaryCaptureImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
    assert np.array_equal(ds.pixel_array, image)
    assert ds.PatientName == "SYNTHETIC" and ds.PatientID.startswith("SYN-")
    assert ds.ConversionType == "SYN" and ds.BurnedInAnnotation == "NO"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert "not a real patient" in ds.ImageComments and "synthetic" in ds.SeriesDescription
    assert ds.Modality == "OT" and dicom.read_label(ds) == 1


def test_write_dicom_uids_reproducible_from_source(tmp_path: Path) -> None:
    image = np.zeros((8, 8), np.uint8)
    a = dicom.write_dicom(tmp_path / "a.dcm", image, label=0, synthetic=True, uid_source="x")
    b = dicom.write_dicom(tmp_path / "b.dcm", image, label=0, synthetic=True, uid_source="x")
    c = dicom.write_dicom(tmp_path / "c.dcm", image, label=0, synthetic=True)
    assert a.read_bytes() == b.read_bytes()
    assert pydicom.dcmread(c).SOPInstanceUID != pydicom.dcmread(a).SOPInstanceUID


def test_write_dicom_real_archive_style(tmp_path: Path) -> None:
    image = np.zeros((4, 6), np.uint8)
    path = dicom.write_dicom(
        tmp_path / "r.dcm", image, label=None, synthetic=False, hospital="h1", instance_number=3
    )
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CR" and str(ds.PatientName) == "ANON^h1^3"
    assert (ds.Rows, ds.Columns) == (4, 6) and dicom.read_label(ds) is None


def test_write_dicom_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        dicom.write_dicom(tmp_path / "x.dcm", np.zeros((4, 4)), label=0, synthetic=True)


# --- hospital archives: the acceptance round trip ---------------------------------------


def source_images(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "random":
        rng = np.random.default_rng(1)
        return rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), rng.integers(0, 2, (60, 1))
    if not SHARED_NPZ.is_file():
        pytest.skip(f"shared data file not found at {SHARED_NPZ}")
    with np.load(SHARED_NPZ) as npz:
        return npz["train_images"][:120], npz["train_labels"][:120]


@pytest.mark.parametrize("kind", ["random", "pneumoniamnist"])
def test_hospital_archives_read_back_to_same_pixels_and_labels(tmp_path: Path, kind: str) -> None:
    """ACCEPTANCE: hospitals make archives that read back through ingest unchanged."""
    images, labels = source_images(kind)
    source = tmp_path / "source.npz"
    np.savez(source, train_images=images, train_labels=labels)
    dirs = dicom.make_hospital_archives(
        source, 2, "dirichlet", 0.5, 0.25, seed=3, out=tmp_path / "out", progress=False
    )
    expected = data.make_hospitals(data.load_npz(source), 2, "dirichlet", 0.5, 0.25, seed=3)
    assert [d.name for d in dirs] == ["hospital-0", "hospital-1"]
    for hospital_dir, h in zip(dirs, expected, strict=True):
        result = ingest(hospital_dir, image_size=28)
        assert result.skipped == [] and result.used == len(h.rows)
        assert np.array_equal(result.data.images, images[h.rows])
        assert np.array_equal(result.data.labels, labels[h.rows, 0])
        # The client re-derives exactly the simulated train/holdout split.
        info = json.loads((hospital_dir / "hospital.json").read_text())
        assert info["images"] == len(h.rows) and info["holdout"] == len(h.holdout)
        assert info["source"]["sha256"] and info["seed"] == 3
        again = data.split_hospital(h.name, result.data, 0.25, info["holdout_seed"])
        assert np.array_equal(again.holdout.images, h.holdout.images)
        assert np.array_equal(again.train.labels, h.train.labels)


def test_write_archive_is_deterministic(tmp_path: Path) -> None:
    split = Split(np.arange(2 * 16, dtype=np.uint8).reshape(2, 4, 4), np.array([0, 1]))
    assert dicom.write_archive(split, tmp_path / "a", "h") == 2
    dicom.write_archive(split, tmp_path / "b", "h")
    for name in ("h-00000.dcm", "h-00001.dcm"):
        assert (tmp_path / "a/dicom" / name).read_bytes() == (
            tmp_path / "b/dicom" / name
        ).read_bytes()
    assert (tmp_path / "a/labels.csv").read_text().splitlines() == [
        "file,label",
        "h-00000.dcm,0",
        "h-00001.dcm,1",
    ]


def test_hospitals_make_never_overwrites_an_archive_unless_forced(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(4)
    source = tmp_path / "source.npz"
    np.savez(source, train_images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (40, 1)))  # fmt: skip
    make = ["hospitals", "make", "--source", str(source), "--hospitals", "2", "--out"]
    assert main([*make, str(tmp_path / "out"), "--partition", "iid"]) == 0
    capsys.readouterr()
    labels = tmp_path / "out" / "hospital-0" / "labels.csv"
    before = labels.read_bytes()
    (tmp_path / "out" / "hospital-0" / "dicom" / "note.txt").write_text("kept")
    assert main([*make, str(tmp_path / "out"), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "hospital-0 exists" in err and "--force" in err
    assert labels.read_bytes() == before
    assert (tmp_path / "out" / "hospital-0" / "dicom" / "note.txt").exists()
    assert main([*make, str(tmp_path / "out"), "--seed", "1", "--force"]) == 0
    assert labels.read_bytes() != before  # the new split, and nothing of the old archive
    assert not (tmp_path / "out" / "hospital-0" / "dicom" / "note.txt").exists()
