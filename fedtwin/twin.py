"""Make a synthetic twin with the global generator and write its directory.

Twin directory (the contract in DESIGN.md)::

    images.npz      train_images uint8 (N, H, W), train_labels uint8 (N, 1)  (MedMNIST keys)
    labels.csv      file,label  (file = the DICOM file of each image)
    dicom/*.dcm     Secondary Capture, marked synthetic, no PHI
    manifest.json   config, code version, rounds, epsilon per hospital, delta, sha256 of files

    audit.json      the federated privacy audit (fedtwin.audit), when there was one
    manifest.sig    Ed25519 signature over manifest.json (fedtwin.signing), if it passed
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydicom.uid import generate_uid
from tqdm import tqdm

from fedtwin import __version__
from fedtwin.dicom import write_dicom
from fedtwin.jsonio import write_json
from fedtwin.models.base import TwinGenerator
from fedtwin.signing import load_public_key, sha256_file, verify_twin
from fedtwin.tensors import to_planes, to_uint8


def label_mix(
    shares: np.ndarray, n: int, mode: str, seed: int, weights: np.ndarray | None = None
) -> np.ndarray:
    """``n`` labels ``(n,)`` int64 with class counts proportional to ``shares`` (or equal),
    each class's share multiplied by its entry of ``weights`` (``twin.class_weights``:
    over-sampling a rare class) and the shares made to sum to 1 again.

    ``mode`` is ``federation`` (the hospitals' label proportions) or ``balanced``. Counts are
    exact (largest remainder), the order is shuffled with ``seed``.
    """
    k = len(shares)
    if mode == "balanced":
        p = np.full(k, 1.0 / k)
    elif mode == "federation":
        p = np.asarray(shares, dtype=float) / np.sum(shares)
    else:
        raise ValueError(f"twin.label_mix: expected 'federation' or 'balanced', got {mode!r}")
    if weights is not None:
        p = p * np.asarray(weights, dtype=float)
        p = p / p.sum()
    raw = p * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(counts - raw, kind="stable")[: n - counts.sum()]] += 1
    labels = np.repeat(np.arange(k), counts)
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


@torch.no_grad()
def generate(
    model: TwinGenerator,
    labels: np.ndarray,
    seed: int,
    batch: int = 500,
    progress: bool = False,
    device: str = "cpu",
) -> np.ndarray:
    """One image per label: ``labels (N,)`` -> uint8 ``(N, H, W)``, computed on ``device``."""
    rng = torch.Generator().manual_seed(seed)
    model.to(device)
    out = []
    for start in tqdm(range(0, len(labels), batch), desc="generate", disable=not progress):
        y = torch.as_tensor(labels[start : start + batch], dtype=torch.long, device=device)
        out.append(to_uint8(model.sample(y, rng)))
    model.cpu()
    return (
        np.concatenate(out) if out else np.zeros((0, model.image_size, model.image_size), np.uint8)
    )


def generate_from_rounds(
    models: list[TwinGenerator], labels: np.ndarray, seed: int, device: str = "cpu"
) -> np.ndarray:
    """A checkpoint ensemble: ``models`` (the global generators of the last rounds) make
    equal consecutive shares of ``labels``, in order; uint8 ``(N, H, W)``.

    A DP-trained GAN swings from round to round (the discriminator sees noisy gradients),
    so one round's generator may lean towards some modes; a twin drawn from several
    rounds evens that out. Labels from ``label_mix`` are shuffled, so every share has the
    twin's label mix up to sampling. The models are DP outputs every hospital already
    received: drawing from them costs no privacy.
    """
    if not models:
        raise ValueError("generate_from_rounds: no generator given")
    shares = np.array_split(np.arange(len(labels)), len(models))
    return np.concatenate(
        [
            generate(model, labels[idx], seed + i, device=device)
            for i, (model, idx) in enumerate(zip(models, shares, strict=True))
        ]
    )


def write_twin(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: list[str],
    provenance: dict[str, Any],
    dicom: bool = True,
    documents: dict[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Write the twin directory ``out`` and its ``manifest.json``; returns the manifest path.

    ``provenance`` goes into the manifest (config, rounds, epsilon per hospital, ...), its
    ``config`` without local paths (``without_local_paths``); ``documents`` are JSON files
    written beside the images (``audit.json``), hashed too.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.sig").unlink(missing_ok=True)  # a new twin is unsigned until signed
    for name, value in (documents or {}).items():
        write_json(out / name, value)
    np.savez_compressed(
        out / "images.npz",
        train_images=images.astype(np.uint8),
        train_labels=labels.astype(np.uint8).reshape(-1, 1),
    )
    names = [f"twin-{i:06d}.dcm" for i in range(len(images))]
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(zip(names, labels.tolist(), strict=True))
    if dicom:
        series, study = generate_uid(), generate_uid()
        for i, name in enumerate(tqdm(names, desc="dicom", disable=not progress)):
            write_dicom(
                out / "dicom" / name,
                images[i],
                label=int(labels[i]),
                synthetic=True,
                series_uid=series,
                study_uid=study,
                instance_number=i + 1,
            )
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in _NOT_HASHED)
    manifest = {
        "kind": "fedtwin synthetic twin",
        "code_version": __version__,
        "size": int(len(images)),
        "image_shape": list(images.shape[1:]),
        "classes": {str(i): name for i, name in enumerate(class_names)},
        "class_counts": np.bincount(labels, minlength=len(class_names)).tolist(),
        **provenance,
        **({"config": without_local_paths(provenance["config"])} if "config" in provenance else {}),
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
    }
    return write_json(out / "manifest.json", manifest)


_NOT_HASHED = {"manifest.json", "manifest.sig"}
# settings that name a file or folder on the operator's machine (fedtwin/schema.py)
LOCAL_PATHS = ("data.path", "data.cache_dir", "twin.signing_key")


def without_local_paths(config: Any, key: str = "") -> Any:
    """A run config as a manifest records it: a twin leaves the consortium, its operator's
    folders do not. The settings in ``LOCAL_PATHS``, and any other absolute path, are
    reduced to their last part (``/srv/data/pneumonia.npz`` -> ``pneumonia.npz``)."""
    if isinstance(config, dict):
        return {k: without_local_paths(v, f"{key}.{k}" if key else k) for k, v in config.items()}
    if isinstance(config, list):
        return [without_local_paths(v, key) for v in config]
    if isinstance(config, str) and (key in LOCAL_PATHS or _absolute(config)):
        return re.split(r"[\\/]", config.rstrip("\\/"))[-1]  # a Windows path's too
    return config


def _absolute(text: str) -> bool:
    """Whether ``text`` is an absolute path: POSIX, home (``~``), a file URL or Windows
    (``C:\\``)."""
    return text.startswith(("/", "~", "file:", "\\\\")) or bool(re.match(r"[A-Za-z]:[\\/]", text))


class UntrustedTwinWarning(UserWarning):
    """A twin loaded without the consortium's public key: its signature shows that the
    files are as signed, not who signed them (anyone who changes a twin can sign it again).
    ``warnings.simplefilter("error", UntrustedTwinWarning)`` makes it an error."""


def _check_twin(twin_dir: Path, public_key: Ed25519PublicKey | Path | str | None) -> None:
    """Raise ValueError if the twin does not verify; warn with its notes if it does, and
    with ``UntrustedTwinWarning`` if no key said who may sign it."""
    if isinstance(public_key, (str, Path)):
        public_key = load_public_key(public_key)
    elif not isinstance(public_key, (Ed25519PublicKey, type(None))):
        raise TypeError(
            f"public_key: expected the consortium's Ed25519 public key or the path of its PEM "
            f"file, not {type(public_key).__name__}"
        )
    result = verify_twin(twin_dir, public_key)
    if not result.ok:
        raise ValueError(
            f"{twin_dir} does not verify: {'; '.join(result.problems)} "
            f"(pass verify=False to load it anyway)"
        )
    if public_key is None:
        warnings.warn(
            f"{twin_dir}: not checked against a trusted key: {'; '.join(result.notes)} "
            "(here: TwinDataset(..., public_key='consortium-signing.pem.pub'))",
            UntrustedTwinWarning,
            stacklevel=3,
        )
    elif result.notes:
        warnings.warn(f"{twin_dir}: {'; '.join(result.notes)}", UserWarning, stacklevel=3)


class TwinDataset(torch.utils.data.Dataset):
    """A twin as a torch ``Dataset`` of ``(image, label)``: float32 ``(C, H, W)`` in [0, 1]
    and an int, from ``images.npz``. Checks the twin first (as ``fedtwin verify``) unless
    ``verify=False``: against ``public_key``, the consortium's Ed25519 public key (a key, or
    the path of its PEM file); without one, the signature is checked against the key the
    twin carries, and an ``UntrustedTwinWarning`` says so::

        from fedtwin import TwinDataset
        ds = TwinDataset("twins/pneumonia", public_key="consortium-signing.pem.pub")
        loader = torch.utils.data.DataLoader(ds, batch_size=64)
    """

    def __init__(
        self,
        twin_dir: Path | str,
        transform=None,
        verify: bool = True,
        public_key: Ed25519PublicKey | Path | str | None = None,
    ):
        twin_dir = Path(twin_dir)
        if verify:
            _check_twin(twin_dir, public_key)
        with np.load(twin_dir / "images.npz") as data:
            self.images = to_planes(data["train_images"])  # (N, C, H, W), grey or colour
            self.labels = torch.from_numpy(data["train_labels"].reshape(-1).astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])
