"""Ingest: a hospital's images as a client trains on them, from a DICOM archive folder or a
MedMNIST npz.

An archive is ``DIR/dicom/*.dcm`` plus ``DIR/labels.csv`` (header ``file,label``, file
relative to ``DIR/dicom``). A file that cannot be used is skipped with a reason, never
fatal; only a labels.csv that cannot be read at all (not UTF-8, not CSV) stops the ingest,
naming its line. Choices: multi-frame files are skipped (the label belongs to the whole
file, and no single frame of a cine or volume stands for it); for a grey dataset
(``data.channels=1``) colour (RGB, YBR, palette) becomes grey (BT.601 luma), for a colour
one (``data.channels=3``) it stays RGB (YBR converted by pydicom, palette looked up) and a
grey file is skipped (a colour model would learn three equal channels from it); 8-bit
MONOCHROME2 or RGB without rescale, LUT or window keeps its pixels exactly; anything else
goes modality LUT -> VOI LUT/window -> MONOCHROME1 inversion -> per-image min-max to 0..255.

Memory stays bounded whatever the files hold: a file larger than ``MAX_FILE_BYTES`` on disk,
or deflated (Deflated Explicit VR Little Endian) to more than that, is skipped before it is
decoded, as is an image of more than ``MAX_PIXELS`` pixels.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian
from tqdm import tqdm

from fedtwin.data import LUMA_WEIGHTS, DataError, Split, empty_split, load_npz, resize_images

# One 2D image: 16-bit 8k x 8k is 128 MiB, so a larger file (or deflated dataset) is
# something else, and reading it whole could take all of a hospital machine's memory.
MAX_FILE_BYTES = 256 << 20
MAX_PIXELS = 32 << 20  # rows x columns x samples; 4096 x 5120 mammograms have 21 Mi
_MAX_REASON = 160  # keeps skip reasons (and logs built from them) readable
_INFLATE_STEP = 1 << 20


@dataclass
class IngestResult:
    """What ``ingest`` read: ``data`` ``(N, S, S)`` (colour ``(N, S, S, 3)``), and every file
    it skipped with why."""

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


def ingest(
    path: Path,
    image_size: int,
    progress: bool = False,
    *,
    n_classes: int | None = None,
    channels: int = 1,
) -> IngestResult:
    """Read a hospital's images: a MedMNIST ``.npz`` (train split) or a DICOM archive folder.

    Images come back ``(N, image_size, image_size)`` uint8 (``channels=3``: ``(..., 3)``
    RGB), rows sorted by file name. With ``n_classes`` a label must be one of
    ``0 .. n_classes - 1`` (``data.classes``).
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npz":
        data = load_npz(path, "train", channels)
        if n_classes is not None and len(data) and data.labels.max() >= n_classes:
            raise DataError(
                f"{path}: train_labels go up to {data.labels.max()}, but the dataset has "
                f"{n_classes} classes (data.classes); use labels 0..{n_classes - 1}"
            )
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
    rows = read_labels(labels_csv)
    on_disk = {p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*") if p.is_file()}
    if image_dir == path:
        on_disk -= {"labels.csv", "hospital.json"}
    skipped = [(n, "not listed in labels.csv") for n in sorted(on_disk - set(rows))]

    root = image_dir.resolve()
    images, labels = [], []
    for name in tqdm(sorted(rows), desc="ingest", unit="file", disable=not progress):
        try:
            label = _label(rows[name], n_classes)
            images.append(_read_image(_archive_file(root, name), image_size, channels))
            labels.append(label)
        except _Skip as e:
            skipped.append((name, str(e)))
    data = (
        Split(np.stack(images), np.array(labels, np.int64))
        if images
        else empty_split(image_size, channels)
    )
    return IngestResult(data, len(data), sorted(skipped), str(path))


def read_labels(labels_csv: Path) -> dict[str, list[tuple[int, str]]]:
    """File name -> ``(line, label text)`` of every row that names it.

    Raises DataError naming the file and line when labels.csv is not UTF-8 text or not CSV
    (a field over the csv module's 128 KiB limit, say).
    """
    raw = labels_csv.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):  # spreadsheets often save CSV with one
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{labels_csv}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
            "save it as CSV UTF-8"
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: dict[str, list[tuple[int, str]]] = {}
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        if "file" not in header or "label" not in header:
            raise DataError(
                f"{labels_csv}: header is {header}; expected 'file,label' "
                "(file relative to dicom/, label a class id 0, 1, ...)"
            )
        reader.fieldnames = header
        for row in reader:
            # Normalised ("./a.dcm" -> "a.dcm") to match the names found on disk.
            name = Path((row["file"] or "").strip()).as_posix()
            if name != ".":
                label = (row["label"] or "").strip()
                rows.setdefault(name, []).append((reader.reader.line_num, label))
    except csv.Error as e:
        raise DataError(
            f"{labels_csv}: line {reader.reader.line_num}: {e}; expected rows 'file,label'"
        ) from None
    return rows


def _label(given: list[tuple[int, str]], n_classes: int | None) -> int:
    """The class id labels.csv gives a file; raises _Skip naming the line of a bad one."""
    texts = sorted({text for _, text in given})
    if len(texts) > 1:
        raise _Skip(f"bad label: labels.csv gives it {texts}")
    line, text = given[0]
    classes = f"0..{n_classes - 1}" if n_classes else "0, 1, ..."
    if not re.fullmatch(r"[0-9]{1,9}", text):  # ASCII digits: int() would take '٣' too
        raise _Skip(
            f"bad label: {text[:20]!r} (labels.csv line {line}) is not a class id {classes}"
        )
    if n_classes is not None and int(text) >= n_classes:
        raise _Skip(
            f"bad label: {text} (labels.csv line {line}) is not one of the {n_classes} "
            f"classes {classes} (data.classes)"
        )
    return int(text)


def _archive_file(root: Path, name: str) -> Path:
    """The file ``name`` of labels.csv, if it is a file inside ``root``; raises _Skip."""
    try:
        file = (root / name).resolve()
        if not file.is_relative_to(root):
            raise _Skip("bad path: outside the archive folder")
        if not file.is_file():  # also keeps devices and pipes out
            raise _Skip("missing on disk")
    except RuntimeError as e:  # Python < 3.13 reports a loop so
        raise _Skip("bad path: a loop of symbolic links") from e
    except (OSError, ValueError) as e:  # a loop (3.13), a NUL byte, a name too long
        raise _Skip(_reason("bad path", e)) from e
    return file


def _read_image(file: Path, image_size: int, channels: int = 1) -> np.ndarray:
    """One DICOM file as an ``(image_size, image_size)`` uint8 image (``channels=3``:
    ``(..., 3)``); raises _Skip."""
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise _Skip(f"too large: over {MAX_FILE_BYTES >> 20} MiB on disk for one image")
        with warnings.catch_warnings():
            # pydicom warns about many harmless oddities; a skip reason is what a user needs.
            warnings.simplefilter("ignore")
            _check_inflated_size(raw)
            # From memory: pydicom then reads what the file holds, not what its lengths say.
            image = _to_uint8(pydicom.dcmread(io.BytesIO(raw)), channels)
    except _Skip:
        raise
    except InvalidDicomError as e:
        # pydicom's own message suggests force=True, which is no advice for a user.
        raise _Skip("not DICOM: no Part-10 header (128-byte preamble and 'DICM')") from e
    except Exception as e:  # any failure on one file must only skip it
        raise _Skip(_reason("unreadable", e)) from e
    try:
        return resize_images(image[None], image_size)[0]
    except Exception as e:
        raise _Skip(_reason("cannot resize", e)) from e


def _check_inflated_size(raw: bytes) -> None:
    """Raise _Skip if ``raw`` is deflated and inflates to more than ``MAX_FILE_BYTES``.

    pydicom inflates a deflated dataset whole, in one call; this inflates it a step at a
    time, keeping nothing, to measure it first. It finds where the deflated bytes begin as
    pydicom does (after the file meta and any command set), with pydicom's own readers.
    """
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    if _read_file_meta_info(fp).get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    _read_command_set_elements(fp)
    inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
    pending = memoryview(raw)[fp.tell() :]
    while pending and not inflater.eof:
        size += len(inflater.decompress(pending, _INFLATE_STEP))
        pending = inflater.unconsumed_tail
        if size > MAX_FILE_BYTES:
            raise _Skip(f"too large: deflated data inflates to over {MAX_FILE_BYTES >> 20} MiB")


def _reason(kind: str, e: Exception) -> str:
    message = " ".join(str(e).split())
    return f"{kind}: {type(e).__name__}: {message}"[:_MAX_REASON]


def _to_uint8(ds: Dataset, channels: int = 1) -> np.ndarray:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _Skip("no pixel data")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise _Skip(f"multi-frame: {frames} frames; fedtwin needs one 2D image per file")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * columns * int(ds.get("SamplesPerPixel") or 1) > MAX_PIXELS:
        raise _Skip(f"too large: {rows} x {columns} pixels, over {MAX_PIXELS >> 20} Mi")
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder plugins raise various types
        raise _Skip(_reason("cannot decode", e)) from e
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    colour = arr.ndim == 3 and arr.shape[-1] == 3
    if channels == 3 and not colour:
        raise _Skip(
            f"grey image ({photometric}) in a colour dataset (data.channels=3); "
            "leave it out of the archive or train a grey dataset"
        )
    if _is_plain_8bit(ds) or (colour and channels == 3 and arr.dtype == np.uint8):
        return arr  # already fedtwin's format: keep the pixels exactly
    if colour and channels == 3:
        return _min_max(arr)  # e.g. a 16-bit palette: one scale for the three channels
    if colour:
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
