"""DICOM for fedtwin: write images (hospital test archives, synthetic twins).

An archive is ``DIR/dicom/*.dcm`` plus ``DIR/labels.csv`` (header ``file,label``, file
relative to ``DIR/dicom``); ``fedtwin.ingest`` reads one back.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from tqdm import tqdm

from fedtwin.data import Split, load_npz, make_hospitals

SYNTHETIC_STATEMENT = "fedtwin synthetic image - not a real patient"
# The class label also travels inside each file, in a private block, so a lone .dcm from a
# twin still says which class it was drawn for. labels.csv stays the reference on ingest.
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "fedtwin"
_LABEL_ELEMENT = 0x01
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
    """Write one ``(H, W)`` uint8 image (or colour ``(H, W, 3)``) as a Secondary Capture
    DICOM Part-10 file.

    Explicit VR little endian, 8 bits, MONOCHROME2 (or RGB, colour-by-pixel). No real
    identifiers are ever written: PatientName is ``SYNTHETIC`` (synthetic) or
    ``ANON^<hospital>^<instance_number>``, and PatientID an opaque hash.
    ``synthetic=True`` marks the file as a fedtwin synthetic image (ImageType
    DERIVED/SECONDARY, ConversionType SYN, SeriesDescription and ImageComments say it is
    not a real patient).

    Args:
        label: class id, stored in the fedtwin private block (None = not stored).
        series_uid, study_uid: shared by all files of one series/study; generated if None.
        uid_source: a string unique to this image; when given, all generated UIDs derive
            from it, so rewriting gives identical files. Without it, UIDs are random.
        modality: defaults to "OT" for synthetic images, "CR" otherwise.
    """
    colour = image.ndim == 3 and image.shape[2] == 3
    if not (image.ndim == 2 or colour) or image.dtype != np.uint8:
        raise ValueError(
            f"{path}: image must be (H, W) or (H, W, 3) uint8, got {image.shape} {image.dtype}"
        )

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

    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0  # R, G, B of one pixel, then the next
    ds.Rows, ds.Columns = image.shape[:2]
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
    *,
    replace: bool = False,
) -> list[Path]:
    """Split the train split of a MedMNIST npz into hospitals and write one archive each.

    Each ``out/<hospital>/`` gets ALL the hospital's images (train and holdout) in source
    row order, plus ``hospital.json``. The holdout is not marked in the files: a client
    re-derives it with ``fedtwin.data.split_hospital(name, ingested, holdout_fraction,
    holdout_seed)``, where ``holdout_seed`` is in hospital.json; since sorted file names
    give the write order, that reproduces ``make_hospitals`` exactly.

    An archive folder that exists already is refused (FileExistsError), or with
    ``replace=True`` deleted first.
    """
    source, out = Path(source), Path(out)
    existing = [out / f"hospital-{i}" for i in range(n_hospitals)]
    existing = [d for d in existing if d.exists() or d.is_symlink()]
    if existing and not replace:
        raise FileExistsError(
            f"{existing[0]} exists (an archive from an earlier run?); choose another --out, "
            f"or pass --force to replace {len(existing)} existing archive(s)"
        )
    data = load_npz(source, "train", channels=None)  # grey or colour, as the file has them
    source_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    n_classes = int(data.labels.max()) + 1 if len(data) else 0
    hospitals = make_hospitals(data, n_hospitals, scheme, alpha, holdout_fraction, seed)
    for d in existing:  # only once the new archives can be made
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
        else:
            d.unlink()
    dirs = []
    for i, h in enumerate(hospitals):
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
