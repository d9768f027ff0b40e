"""DICOM for fedtwin: write images (hospital test archives, synthetic twins), read archives back.

An archive is ``DIR/dicom/*.dcm`` plus ``DIR/labels.csv`` (header ``file,label``, file
relative to ``DIR/dicom``). ``ingest`` turns an archive, or a MedMNIST npz, into a ``Split``;
a file it cannot use is skipped with a reason, never fatal. Its choices: multi-frame files
are skipped (the label belongs to the whole file, and no single frame of a cine or volume
stands for it); colour (RGB, YBR, palette) becomes grey (BT.601 luma); 8-bit MONOCHROME2
without rescale, LUT or window keeps its pixels exactly; anything else goes modality LUT ->
VOI LUT/window -> MONOCHROME1 inversion -> per-image min-max to 0..255.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from tqdm import tqdm

from fedtwin.data import (
    LUMA_WEIGHTS,
    DataError,
    Split,
    empty_split,
    load_npz,
    make_hospitals,
    resize_images,
)

SYNTHETIC_STATEMENT = "fedtwin synthetic image - not a real patient"
# The class label also travels inside each file, in a private block, so a lone .dcm from a
# twin still says which class it was drawn for. labels.csv stays the reference on ingest.
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "fedtwin"
_LABEL_ELEMENT = 0x01
_MAX_REASON = 160  # keeps skip reasons (and logs built from them) readable
# Type 2 attributes of the SC IOD: present, deliberately empty (no dates, no people).
_EMPTY_TYPE2 = (
    "PatientBirthDate PatientSex StudyDate StudyTime ReferringPhysicianName StudyID "
    "AccessionNumber PatientOrientation"
).split()


def write_dicom(
    path: Path,
    image: np.ndarray,
    *,
    label: int | None,
    synthetic: bool,
    series_uid: str | None = None,
    study_uid: str | None = None,
    instance_number: int = 1,
    uid_source: str | None = None,
    hospital: str | None = None,
    modality: str | None = None,
) -> Path:
    """Write one ``(H, W)`` uint8 image as a Secondary Capture DICOM Part-10 file.

    Explicit VR little endian, MONOCHROME2, 8 bits. No real identifiers are ever written:
    PatientName is ``SYNTHETIC`` (synthetic) or ``ANON^<hospital>^<instance_number>``, and
    PatientID an opaque hash. ``synthetic=True`` marks the file as a fedtwin synthetic
    image (ImageType DERIVED/SECONDARY, ConversionType SYN, SeriesDescription and
    ImageComments say it is not a real patient).

    Args:
        label: class id, stored in the fedtwin private block (None = not stored).
        series_uid, study_uid: shared by all files of one series/study; generated if None.
        uid_source: a string unique to this image; when given, all generated UIDs derive
            from it, so rewriting gives identical files. Without it, UIDs are random.
        modality: defaults to "OT" for synthetic images, "CR" otherwise.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"{path}: image must be (H, W) uint8, got {image.shape} {image.dtype}")

    def uid(part: str) -> str:
        return generate_uid(entropy_srcs=[uid_source, part]) if uid_source else generate_uid()

    sop_uid = uid("instance")
    opaque = hashlib.sha256(sop_uid.encode()).hexdigest()[:12].upper()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or uid("study")
    ds.SeriesInstanceUID = series_uid or uid("series")
    ds.Modality = modality or ("OT" if synthetic else "CR")
    for keyword in _EMPTY_TYPE2:
        setattr(ds, keyword, "")
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientIdentityRemoved = "YES"
    ds.BurnedInAnnotation = "NO"
    if synthetic:
        ds.PatientName = "SYNTHETIC"
        ds.PatientID = f"SYN-{opaque}"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ConversionType = "SYN"
        ds.SeriesDescription = SYNTHETIC_STATEMENT
        ds.ImageComments = SYNTHETIC_STATEMENT
        ds.DeidentificationMethod = "fedtwin synthetic image: generated, no source patient"
    else:
        ds.PatientName = f"ANON^{hospital or 'fedtwin'}^{instance_number}"
        ds.PatientID = f"ANON-{opaque}"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.ConversionType = "WSD"
        ds.DeidentificationMethod = "fedtwin archive from a public de-identified dataset"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = image.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image).tobytes()
    if label is not None:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(_LABEL_ELEMENT, "IS", int(label))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def read_label(ds: Dataset) -> int | None:
    """The class id written by ``write_dicom`` (None if the file has none)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        return int(block[_LABEL_ELEMENT].value)
    except (KeyError, ValueError, TypeError):
        return None


def write_archive(data: Split, out_dir: Path, hospital: str, *, progress: bool = False) -> int:
    """Write ``data`` as ``out_dir/dicom/<hospital>-<index>.dcm`` plus ``out_dir/labels.csv``.

    ``index`` is the row in ``data``, zero-padded so that sorted file names give back the
    row order (ingest relies on it). UIDs derive from the archive's content, so writing
    the same data twice gives identical files. Returns the number of files written.
    """
    out_dir = Path(out_dir)
    (out_dir / "dicom").mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data.images.tobytes() + data.labels.tobytes()).hexdigest()
    source = f"fedtwin-archive/{hospital}/{digest}"
    series_uid = generate_uid(entropy_srcs=[source, "series"])
    study_uid = generate_uid(entropy_srcs=[source, "study"])
    width = max(5, len(str(len(data) - 1)))
    rows = []
    for i in tqdm(range(len(data)), desc=hospital, unit="img", disable=not progress):
        name = f"{hospital}-{i:0{width}d}.dcm"
        write_dicom(
            out_dir / "dicom" / name,
            data.images[i],
            label=int(data.labels[i]),
            synthetic=False,
            series_uid=series_uid,
            study_uid=study_uid,
            instance_number=i + 1,
            uid_source=f"{source}/{i}",
            hospital=hospital,
        )
        rows.append((name, int(data.labels[i])))
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    return len(rows)


def make_hospital_archives(
    source: Path,
    n_hospitals: int,
    scheme: str,
    alpha: float,
    holdout_fraction: float,
    seed: int,
    out: Path,
    progress: bool = True,
) -> list[Path]:
    """Split the train split of a MedMNIST npz into hospitals and write one archive each.

    Each ``out/<hospital>/`` gets ALL the hospital's images (train and holdout) in source
    row order, plus ``hospital.json``. The holdout is not marked in the files: a client
    re-derives it with ``fedtwin.data.split_hospital(name, ingested, holdout_fraction,
    holdout_seed)``, where ``holdout_seed`` is in hospital.json; since sorted file names
    give the write order, that reproduces ``make_hospitals`` exactly.
    """
    source, out = Path(source), Path(out)
    data = load_npz(source, "train")
    source_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    n_classes = int(data.labels.max()) + 1 if len(data) else 0
    dirs = []
    for i, h in enumerate(make_hospitals(data, n_hospitals, scheme, alpha, holdout_fraction, seed)):
        hospital_dir = out / h.name
        all_images = data.subset(h.rows)
        write_archive(all_images, hospital_dir, h.name, progress=progress)
        info = {
            "name": h.name,
            "index": i,
            "images": len(all_images),
            "train": len(h.train),
            "holdout": len(h.holdout),
            "class_counts": all_images.class_counts(n_classes).tolist(),
            "seed": seed,
            "holdout_fraction": holdout_fraction,
            "holdout_seed": h.holdout_seed,
            "partition": {"scheme": scheme, "alpha": alpha, "hospitals": n_hospitals},
            "source": {"file": source.name, "sha256": source_sha},
            "holdout_rule": "images in sorted file-name order; holdout = "
            "fedtwin.data.holdout_split(images, holdout_fraction, holdout_seed)",
        }
        (hospital_dir / "hospital.json").write_text(json.dumps(info, indent=2) + "\n")
        dirs.append(hospital_dir)
    return dirs


# --- ingest -----------------------------------------------------------------------------


@dataclass
class IngestResult:
    """What ``ingest`` read: ``data`` ``(N, S, S)``, and every file it skipped with why."""

    data: Split
    used: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""

    def summary(self) -> str:
        """One line, e.g. ``ingested 935 images from DIR; skipped 3: 2 no pixel data, ...``."""
        text = f"ingested {self.used} images from {self.source or 'archive'}"
        if not self.skipped:
            return text
        kinds = Counter(reason.split(":")[0] for _, reason in self.skipped)
        example = {r.split(":")[0]: f"{n}: {r}" for n, r in reversed(self.skipped)}
        parts = [f"{count} {kind} (e.g. {example[kind]})" for kind, count in kinds.most_common()]
        return f"{text}; skipped {len(self.skipped)}: " + ", ".join(parts)


class _Skip(Exception):
    """A file that cannot be used; the message is the skip reason."""


def ingest(path: Path, image_size: int, progress: bool = False) -> IngestResult:
    """Read a hospital's images: a MedMNIST ``.npz`` (train split) or a DICOM archive folder.

    Images come back ``(N, image_size, image_size)`` uint8, rows sorted by file name.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        data = load_npz(path, "train")
        data = Split(resize_images(data.images, image_size), data.labels)
        return IngestResult(data, len(data), [], str(path))
    if not path.is_dir():
        raise DataError(
            f"{path}: expected a MedMNIST .npz file or a folder with labels.csv and dicom/"
        )
    labels_csv = path / "labels.csv"
    if not labels_csv.is_file():
        raise DataError(
            f"{labels_csv}: missing; an archive folder needs labels.csv with header "
            "'file,label' (file relative to dicom/, label a class id 0, 1, ...)"
        )
    image_dir = path / "dicom" if (path / "dicom").is_dir() else path
    rows = _read_labels(labels_csv)
    on_disk = {p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*") if p.is_file()}
    if image_dir == path:
        on_disk -= {"labels.csv", "hospital.json"}
    skipped = [(n, "not listed in labels.csv") for n in sorted(on_disk - set(rows))]

    images, labels = [], []
    for name in tqdm(sorted(rows), desc="ingest", unit="file", disable=not progress):
        try:
            if len(rows[name]) > 1:
                raise _Skip(f"bad label: labels.csv gives it {sorted(rows[name])}")
            (text,) = rows[name]
            if not re.fullmatch(r"\d+", text):
                raise _Skip(f"bad label: {text[:20]!r} is not a class id 0, 1, ...")
            file = (image_dir / name).resolve()
            if not file.is_relative_to(image_dir.resolve()):
                raise _Skip("bad path: outside the archive folder")
            if not file.is_file():
                raise _Skip("missing on disk")
            images.append(_read_image(file, image_size))
            labels.append(int(text))
        except _Skip as e:
            skipped.append((name, str(e)))
    data = (
        Split(np.stack(images), np.array(labels, np.int64)) if images else empty_split(image_size)
    )
    return IngestResult(data, len(data), sorted(skipped), str(path))


def _read_labels(labels_csv: Path) -> dict[str, set[str]]:
    """File name -> the label texts given for it (more than one = a conflict)."""
    # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if "file" not in header or "label" not in header:
            raise DataError(
                f"{labels_csv}: header is {header}; expected 'file,label' "
                "(file relative to dicom/, label a class id 0, 1, ...)"
            )
        reader.fieldnames = header
        rows: dict[str, set[str]] = {}
        for row in reader:
            # Normalised ("./a.dcm" -> "a.dcm") to match the names found on disk.
            name = Path((row["file"] or "").strip()).as_posix()
            if name != ".":
                rows.setdefault(name, set()).add((row["label"] or "").strip())
    return rows


def _read_image(file: Path, image_size: int) -> np.ndarray:
    """One DICOM file as an ``(image_size, image_size)`` uint8 image; raises _Skip."""
    try:
        with warnings.catch_warnings():
            # pydicom warns about many harmless oddities; a skip reason is what a user needs.
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(file)
            image = _to_uint8(ds)
    except _Skip:
        raise
    except InvalidDicomError as e:
        # pydicom's own message suggests force=True, which is no advice for a user.
        raise _Skip("not DICOM: no Part-10 header (128-byte preamble and 'DICM')") from e
    except Exception as e:  # any failure on one file must only skip it
        raise _Skip(_reason("unreadable", e)) from e
    return resize_images(image[None], image_size)[0]


def _reason(kind: str, e: Exception) -> str:
    message = " ".join(str(e).split())
    return f"{kind}: {type(e).__name__}: {message}"[:_MAX_REASON]


def _to_uint8(ds: Dataset) -> np.ndarray:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Skip("no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise _Skip(f"multi-frame: {frames} frames; fedtwin needs one 2D image per file")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder plugins raise various types
        raise _Skip(_reason("cannot decode", e)) from e
    if _is_plain_8bit(ds):
        return arr  # already fedtwin's format: keep the pixels exactly
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        values = arr.astype(np.float64) @ LUMA_WEIGHTS
    elif arr.ndim == 2:
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
        if photometric == "MONOCHROME1":
            values = -values  # MONOCHROME1 shows low values bright; fedtwin wants bright = dense
    else:
        raise _Skip(f"unsupported: pixel array of shape {arr.shape} ({photometric})")
    return _min_max(values)


def _is_plain_8bit(ds: Dataset) -> bool:
    return (
        ds.get("BitsAllocated") == 8
        and ds.get("BitsStored") == 8
        and ds.get("PixelRepresentation", 0) == 0
        and ds.get("SamplesPerPixel", 1) == 1
        and ds.get("PhotometricInterpretation") == "MONOCHROME2"
        and float(ds.get("RescaleSlope", 1) or 1) == 1
        and float(ds.get("RescaleIntercept", 0) or 0) == 0
        and not any(k in ds for k in ("ModalityLUTSequence", "VOILUTSequence", "WindowCenter"))
    )


def _min_max(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64))
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, np.uint8)  # a flat image carries no contrast to keep
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
