"""Tests for fedtwin.dicom: writing DICOM, hospital archives, and ingest of real-world folders."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from fedtwin import data, dicom
from fedtwin.data import DataError, Split

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist_28_trainval.npz"


def write_labels(archive: Path, rows: list[tuple[str, object]]) -> None:
    with open(archive / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)


def make_archive(tmp_path: Path, images: np.ndarray, labels: list[int]) -> Path:
    archive = tmp_path / "archive"
    dicom.write_archive(Split(images, np.array(labels, np.int64)), archive, "h")
    return archive


def rewrite(path: Path, **attrs: object) -> None:
    """Change attributes of an existing file (to build test cases write_dicom never makes)."""
    ds = pydicom.dcmread(path)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


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
        result = dicom.ingest(hospital_dir, image_size=28)
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


# --- ingest: real-world folders -----------------------------------------------------------


def test_ingest_pydicom_test_files_never_crashes(tmp_path: Path) -> None:
    """ACCEPTANCE: every file of pydicom's test corpus is either ingested or skipped with why."""
    base = Path(pydicom.data.__file__).parent / "test_files"
    archive = tmp_path / "archive"
    (archive / "dicom").mkdir(parents=True)
    names = []
    for file in map(Path, pydicom.data.get_testdata_files()):
        if file.is_file():
            name = file.relative_to(base).as_posix().replace("/", "__")
            shutil.copyfile(file, archive / "dicom" / name)
            names.append(name)
    rng = np.random.default_rng(0)
    (archive / "dicom/corrupt.dcm").write_bytes(rng.integers(0, 256, 4096, np.uint8).tobytes())
    (archive / "dicom/notes.txt").write_text("not an image\n")
    names += ["corrupt.dcm", "notes.txt"]
    write_labels(archive, [(n, 0) for n in names])

    result = dicom.ingest(archive, image_size=28)
    assert len(names) > 100
    assert result.used + len(result.skipped) == len(names)
    assert result.used >= 1 and len(result.skipped) >= 1
    assert all(reason.strip() for _, reason in result.skipped)
    assert result.data.images.shape == (result.used, 28, 28)
    assert result.data.images.dtype == np.uint8 and result.data.labels.dtype == np.int64
    reasons = dict(result.skipped)
    assert reasons["corrupt.dcm"].startswith("not DICOM")
    assert reasons["notes.txt"].startswith("not DICOM")
    assert reasons["rtplan.dcm"] == "no pixel data"
    assert "CT_small.dcm" not in reasons and "MR_small.dcm" not in reasons
    assert result.summary().startswith(f"ingested {result.used} images from {archive}; skipped")


def test_ingest_skips_with_reasons(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    archive = make_archive(tmp_path, images, [0, 1, 0, 1])
    (archive / "dicom/extra.dcm").write_bytes(b"x")
    write_labels(
        archive,
        [
            ("h-00000.dcm", 0),
            ("h-00000.dcm", 0),  # a repeated row that agrees is harmless
            ("h-00001.dcm", 1),
            ("h-00001.dcm", 0),  # rows that disagree: the file is skipped
            ("./h-00002.dcm", 1),
            ("h-00003.dcm", "pneumonia"),
            ("gone.dcm", 0),
            ("../labels.csv", 0),
        ],
    )
    result = dicom.ingest(archive, image_size=28)
    assert result.used == 2 and result.data.labels.tolist() == [0, 1]
    assert np.array_equal(result.data.images, images[[0, 2]])
    reasons = dict(result.skipped)
    assert reasons["extra.dcm"] == "not listed in labels.csv"
    assert reasons["gone.dcm"] == "missing on disk"
    assert reasons["h-00001.dcm"] == "bad label: labels.csv gives it ['0', '1']"
    assert reasons["h-00003.dcm"].startswith("bad label: 'pneumonia'")
    assert reasons["../labels.csv"].startswith("bad path")
    assert len(result.skipped) == 5  # one entry per file
    summary = result.summary()
    assert "skipped 5: 2 bad label (e.g. h-00001.dcm: " in summary
    assert "1 not listed in labels.csv (e.g. extra.dcm: not listed in labels.csv)" in summary


def test_ingest_missing_or_bad_labels_csv(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(DataError, match="labels.csv: missing.*'file,label'"):
        dicom.ingest(tmp_path, 28)
    (tmp_path / "labels.csv").write_text("filename,class\na.dcm,0\n")
    with pytest.raises(DataError, match="expected 'file,label'"):
        dicom.ingest(tmp_path, 28)
    with pytest.raises(DataError, match="expected a MedMNIST .npz"):
        dicom.ingest(tmp_path / "nothing-here", 28)


def test_ingest_empty_archive(tmp_path: Path) -> None:
    write_labels(tmp_path, [])
    result = dicom.ingest(tmp_path, 28)
    assert result.used == 0 and result.data.images.shape == (0, 28, 28)


def test_ingest_npz_resizes(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    np.savez(path, train_images=np.full((3, 64, 64), 90, np.uint8), train_labels=np.ones(3, int))
    result = dicom.ingest(path, image_size=28)
    assert result.data.images.shape == (3, 28, 28) and (result.data.images == 90).all()
    assert result.used == 3 and result.skipped == []


def test_ingest_resizes_larger_dicom(tmp_path: Path) -> None:
    image = np.zeros((56, 56), np.uint8)
    image[:, 28:] = 200
    archive = make_archive(tmp_path, image[None], [1])
    got = dicom.ingest(archive, image_size=28).data.images[0]
    assert got.shape == (28, 28)
    assert (got[:, :13] == 0).all() and (got[:, 15:] == 200).all()


def test_ingest_inverts_monochrome1(tmp_path: Path) -> None:
    image = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255  # full range, so the min-max step changes nothing
    archive = make_archive(tmp_path, image[None], [0])
    rewrite(archive / "dicom/h-00000.dcm", PhotometricInterpretation="MONOCHROME1")
    got = dicom.ingest(archive, image_size=28).data.images[0]
    assert np.array_equal(got, 255 - image)


def test_ingest_applies_rescale_and_window(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, np.zeros((1, 28, 28), np.uint8), [0])
    path = archive / "dicom/h-00000.dcm"
    stored = np.linspace(0, 4000, 28 * 28).reshape(28, 28).astype(np.uint16)
    ds = pydicom.dcmread(path)
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    # CT-like: stored + (-1024) = modality value; window [-200, 200] around 0.
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 0, 400
    ds.save_as(path, enforce_file_format=True)

    got = dicom.ingest(archive, image_size=28).data.images[0].astype(float)
    value = stored.astype(float) - 1024
    assert (got[value < -205] == 0).all() and (got[value > 205] == 255).all()
    middle = np.abs(value) < 150
    expected = (value[middle] + 200) / 400 * 255
    assert np.abs(got[middle] - expected).max() <= 2
    # Without the window a plain min-max would put 0 HU near 65, not mid-grey.
    assert np.abs(got[np.abs(value) < 3] - 128).max() <= 3
