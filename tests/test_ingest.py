"""Tests for fedtwin.ingest: real-world folders, careless labels.csv files and hostile DICOM
files are read or skipped with a reason, in bounded memory."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from fedtwin import dicom
from fedtwin.cli import main
from fedtwin.data import DataError, Split
from fedtwin.ingest import MAX_FILE_BYTES, MAX_PIXELS, ingest


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

    result = ingest(archive, image_size=28)
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
    result = ingest(archive, image_size=28)
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
        ingest(tmp_path, 28)
    (tmp_path / "labels.csv").write_text("filename,class\na.dcm,0\n")
    with pytest.raises(DataError, match="expected 'file,label'"):
        ingest(tmp_path, 28)
    with pytest.raises(DataError, match="expected a MedMNIST .npz"):
        ingest(tmp_path / "nothing-here", 28)


def test_ingest_empty_archive(tmp_path: Path) -> None:
    write_labels(tmp_path, [])
    result = ingest(tmp_path, 28)
    assert result.used == 0 and result.data.images.shape == (0, 28, 28)


def test_ingest_npz_resizes(tmp_path: Path) -> None:
    path = tmp_path / "big.npz"
    np.savez(path, train_images=np.full((3, 64, 64), 90, np.uint8), train_labels=np.ones(3, int))
    result = ingest(path, image_size=28)
    assert result.data.images.shape == (3, 28, 28) and (result.data.images == 90).all()
    assert result.used == 3 and result.skipped == []


def test_ingest_resizes_larger_dicom(tmp_path: Path) -> None:
    image = np.zeros((56, 56), np.uint8)
    image[:, 28:] = 200
    archive = make_archive(tmp_path, image[None], [1])
    got = ingest(archive, image_size=28).data.images[0]
    assert got.shape == (28, 28)
    assert (got[:, :13] == 0).all() and (got[:, 15:] == 200).all()


def test_ingest_inverts_monochrome1(tmp_path: Path) -> None:
    image = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255  # full range, so the min-max step changes nothing
    archive = make_archive(tmp_path, image[None], [0])
    rewrite(archive / "dicom/h-00000.dcm", PhotometricInterpretation="MONOCHROME1")
    got = ingest(archive, image_size=28).data.images[0]
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

    got = ingest(archive, image_size=28).data.images[0].astype(float)
    value = stored.astype(float) - 1024
    assert (got[value < -205] == 0).all() and (got[value > 205] == 255).all()
    middle = np.abs(value) < 150
    expected = (value[middle] + 200) / 400 * 255
    assert np.abs(got[middle] - expected).max() <= 2
    # Without the window a plain min-max would put 0 HU near 65, not mid-grey.
    assert np.abs(got[np.abs(value) < 3] - 128).max() <= 3


# --- careless labels.csv and archives -----------------------------------------------------


def test_symlink_loop_or_bad_name_skips_only_that_file(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    archive = make_archive(tmp_path, images, [0, 1])
    (archive / "dicom" / "loop-a.dcm").symlink_to("loop-b.dcm")
    (archive / "dicom" / "loop-b.dcm").symlink_to("loop-a.dcm")
    names = ["h-00000.dcm", "h-00001.dcm", "loop-a.dcm", "a\x00b.dcm", "x" * 5000 + ".dcm"]
    write_labels(archive, [(name, 0) for name in names])
    result = ingest(archive, image_size=28)
    assert result.used == 2 and np.array_equal(result.data.images, images)
    reasons = dict(result.skipped)
    assert reasons["loop-a.dcm"].startswith("bad path")
    assert reasons["a\x00b.dcm"].startswith("bad path")
    assert reasons["x" * 5000 + ".dcm"].startswith("bad path")


def test_a_resize_that_fails_skips_the_file_instead_of_stopping_the_ingest(tmp_path: Path) -> None:
    images = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    archive = make_archive(tmp_path, images, [0, 1])
    result = ingest(archive, image_size=2**31)  # no machine holds such an image
    assert result.used == 0 and len(result.skipped) == 2
    assert all(reason.startswith("cannot resize") for _, reason in result.skipped)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"file,label\nh-00000.dcm,0\n" + b"y" * 200_000 + b".dcm,1\n", "line 3: field larger"),
        ("file,label\nh-00000.dcm,0\nscan-é.dcm,1\n".encode("latin-1"), "line 3: not UTF-8"),
    ],
)
def test_unreadable_labels_csv_is_one_error_naming_file_and_line(
    tmp_path: Path, capsys, content: bytes, match: str
) -> None:
    archive = make_archive(tmp_path, np.zeros((1, 28, 28), np.uint8), [0])
    (archive / "labels.csv").write_bytes(content)
    with pytest.raises(DataError, match=f"labels.csv: {match}"):
        ingest(archive, image_size=28)
    assert main(["ingest", str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels.csv: line 3" in err and "Traceback" not in err


def test_labels_outside_the_classes_or_not_ascii_digits_are_skipped(tmp_path: Path, capsys) -> None:
    images = np.random.default_rng(5).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    archive = make_archive(tmp_path, images, [0, 1, 0, 1])
    # Arabic-Indic three and fullwidth one: int() reads both, a class id they are not
    write_labels(archive, [("h-00000.dcm", 1), ("h-00001.dcm", 2), ("h-00002.dcm", "٣"),
                           ("h-00003.dcm", "１")])  # fmt: skip
    result = ingest(archive, image_size=28, n_classes=2)
    assert result.used == 1 and result.data.labels.tolist() == [1]
    reasons = dict(result.skipped)
    assert reasons["h-00001.dcm"].startswith("bad label: 2 (labels.csv line 3) is not one of")
    assert reasons["h-00002.dcm"].startswith("bad label: '٣' (labels.csv line 4)")
    assert reasons["h-00003.dcm"].startswith("bad label: '１'")
    assert main(["ingest", str(archive)]) == 0  # data.classes: 2 classes
    assert "ingested 1 images" in capsys.readouterr().out


# --- hostile files, in bounded memory -----------------------------------------------------

CAPPED_INGEST = """
import json, re, resource, sys
from fedtwin.ingest import ingest

def vm():
    return int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10

resource.setrlimit(resource.RLIMIT_AS, (vm() + int(sys.argv[2]), resource.RLIM_INFINITY))
result = ingest(sys.argv[1], 28)
print(json.dumps({"used": result.used, "skipped": result.skipped}))
"""
HEADROOM = 512 << 20  # address space the ingest may add to what it started with


def capped_ingest(archive: Path) -> dict:
    """``ingest(archive)`` in a process that cannot take more than HEADROOM more memory."""
    done = subprocess.run(
        [sys.executable, "-c", CAPPED_INGEST, str(archive), str(HEADROOM)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def deflated_bomb(path: Path, inflated_mib: int, *, pixels: bool) -> None:
    """A well-formed deflated DICOM of about 1 MiB per 1000 MiB: its dataset inflates to
    ``inflated_mib`` MiB of zeros, as pixel data of a square image or, with ``pixels``
    false, as a private element of a file without pixel data."""
    ds = pydicom.dcmread(dicom.write_dicom(path, np.zeros((4, 4), np.uint8), label=0,
                                           synthetic=True))  # fmt: skip
    del ds.PixelData
    if pixels:
        ds.Rows = ds.Columns = int((inflated_mib << 20) ** 0.5)
    plain, deflated = io.BytesIO(), io.BytesIO()
    ds.save_as(plain, enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)

    def dataset_start(raw: bytes) -> int:  # preamble, 'DICM', group length element, group 2
        return 132 + 12 + pydicom.dcmread(io.BytesIO(raw)).file_meta.FileMetaInformationGroupLength

    plain_raw, deflated_raw = plain.getvalue(), deflated.getvalue()
    tag = b"\xe0\x7f\x10\x00" if pixels else b"\xe1\x7f\x10\x10"  # (7FE0,0010) or private
    element = tag + b"OB\x00\x00" + (inflated_mib << 20).to_bytes(4, "little")
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    # After a full flush a deflate block stands alone, so one MiB of zeros, compressed
    # once, can be repeated: the file is written in milliseconds.
    head = z.compress(plain_raw[dataset_start(plain_raw) :] + element) + z.flush(zlib.Z_FULL_FLUSH)
    mib = z.compress(bytes(1 << 20)) + z.flush(zlib.Z_FULL_FLUSH)
    body = head + mib * inflated_mib + z.flush()
    path.write_bytes(deflated_raw[: dataset_start(deflated_raw)] + body)


def test_deflate_bombs_are_skipped_before_they_inflate(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, np.zeros((1, 28, 28), np.uint8), [0])
    deflated_bomb(archive / "dicom" / "pixels.dcm", 576, pixels=True)
    deflated_bomb(archive / "dicom" / "no-pixels.dcm", 576, pixels=False)
    assert (archive / "dicom" / "pixels.dcm").stat().st_size < 2 << 20
    write_labels(archive, [("h-00000.dcm", 0), ("pixels.dcm", 1), ("no-pixels.dcm", 1)])
    got = capped_ingest(archive)
    reasons = dict(got["skipped"])
    assert got["used"] == 1 and len(reasons) == 2
    for name in ("pixels.dcm", "no-pixels.dcm"):
        assert (
            reasons[name] == f"too large: deflated data inflates to over {MAX_FILE_BYTES >> 20} MiB"
        )


def test_fuzzed_dicoms_are_each_ingested_or_skipped_with_a_reason(tmp_path: Path) -> None:
    """ACCEPTANCE: valid files with random byte flips and truncations, seeded, in a process
    whose memory is capped: no crash, and every file ingested or skipped with its reason."""
    rng = np.random.default_rng(15)
    work = tmp_path / "seeds"
    seeds = [dicom.write_dicom(work / "8bit.dcm", rng.integers(0, 256, (28, 28), dtype=np.uint8),
                               label=0, synthetic=True).read_bytes()]  # fmt: skip
    ds = pydicom.dcmread(work / "8bit.dcm")
    ds.set_pixel_data(rng.integers(0, 4000, (30, 20)).astype(np.uint16), "MONOCHROME2", 16,
                      generate_instance_uid=False)  # fmt: skip
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 0, 400
    for syntax in (None, DeflatedExplicitVRLittleEndian, RLELossless):
        if syntax == RLELossless:
            ds.compress(RLELossless)
        elif syntax is not None:
            ds.file_meta.TransferSyntaxUID = syntax
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        seeds.append(out.getvalue())
    test_files = Path(pydicom.data.__file__).parent / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm", "image_dfl.dcm", "SC_rgb_small_odd.dcm",
                 "examples_palette.dcm", "MR_small_RLE.dcm"):  # fmt: skip
        seeds.append((test_files / name).read_bytes())

    archive = tmp_path / "archive"
    (archive / "dicom").mkdir(parents=True)
    names = []
    for i in range(300):
        data = bytearray(seeds[i % len(seeds)])
        if rng.random() < 0.3:
            del data[int(rng.integers(0, len(data))) :]
        else:
            for at in rng.integers(0, len(data), int(rng.integers(1, 9))):
                data[at] = int(rng.integers(0, 256))
        names.append(f"fuzz-{i:03d}.dcm")
        (archive / "dicom" / names[-1]).write_bytes(bytes(data))
    write_labels(archive, [(name, i % 2) for i, name in enumerate(names)])

    got = capped_ingest(archive)
    assert got["used"] + len(got["skipped"]) == len(names) and got["used"] >= 30
    assert all(reason.strip() for _, reason in got["skipped"])
    assert not [r for _, r in got["skipped"] if "MemoryError" in r]


def test_image_declaring_more_pixels_than_the_cap_is_skipped_before_decoding(
    tmp_path: Path,
) -> None:
    archive = make_archive(tmp_path, np.zeros((1, 28, 28), np.uint8), [0])
    side = int(MAX_PIXELS**0.5) + 1
    rewrite(archive / "dicom" / "h-00000.dcm", Rows=side, Columns=side)
    (reason,) = [r for _, r in ingest(archive, image_size=28).skipped]
    assert reason == f"too large: {side} x {side} pixels, over {MAX_PIXELS >> 20} Mi"
