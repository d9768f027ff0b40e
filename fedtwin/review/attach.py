"""The pooled reader study into a twin's manifest, signed again.

The study names its twin by the sha256 of the twin's images.npz, which the manifest lists,
so the figures go only into the manifest of the twin the readers read. Every check comes
before anything is written (``prepare``): each hospital's counts must fit the twin (its
class names, its images per class), and a signed twin is verified against the signing key
(a tampered twin is not signed again); ``record`` then writes the manifest and signs it
again. An unsigned twin stays unsigned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtwin.jsonio import write_json
from fedtwin.review.stats import check_fits_twin
from fedtwin.signing import (
    MANIFEST,
    SIGNATURE,
    load_signing_key,
    manifest_files,
    sign_twin,
    verify_twin,
)


@dataclass(frozen=True)
class Update:
    """A checked twin: its manifest, and the key that signs it again (None: the twin is
    unsigned and stays so)."""

    twin: Path
    manifest: dict
    key: Ed25519PrivateKey | None


def prepare(
    twin: Path, summaries: Sequence[tuple[str, Mapping]], signing_key: Path | None
) -> Update:
    """Check that every summary (``(file, aggregate)``, the aggregate checked by
    ``check_aggregate``) is of ``twin`` and fits it, and that a signed twin verifies against
    ``signing_key``; raises ValueError naming the file. Writes nothing."""
    path = twin / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest_files(manifest)  # ValueError unless it lists images.npz
    except (ValueError, RecursionError) as e:
        raise ValueError(
            f"{path}: not a twin's manifest ({e}); is --twin a twin's folder?"
        ) from None
    names, counts = _classes(manifest, path)
    for where, agg in summaries:
        if agg["twin_images_sha256"] != files["images.npz"]:
            raise ValueError(
                f"{where}: its readers read another twin than {twin} (twin_images_sha256 is "
                "not its images.npz's); pool it with the twin it names"
            )
        check_fits_twin(agg, names, counts, where)
    return Update(twin, manifest, _signing_key(twin, signing_key))


def record(update: Update, pooled: dict) -> None:
    """Write the pooled figures (not those per hospital) into the manifest ``prepare``
    read, and sign it again if the twin was signed."""
    study = {k: v for k, v in pooled.items() if k != "per_hospital"}
    manifest = {**update.manifest, "reader_study": study}
    write_json(update.twin / MANIFEST, manifest)
    if update.key is not None:
        sign_twin(update.twin, update.key)


def _classes(manifest: dict, path: Path) -> tuple[list[str], list[int]]:
    """The twin's class names and its images per class (``classes``, ``class_counts``)."""
    classes, counts = manifest.get("classes"), manifest.get("class_counts")
    if not (
        isinstance(classes, dict)
        and isinstance(counts, list)
        and set(classes) == {str(i) for i in range(len(counts))}
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
    ):
        raise ValueError(
            f"{path}: 'classes' and 'class_counts' must name and count the twin's classes "
            "(as `fedtwin demo` writes them)"
        )
    return [classes[str(i)] for i in range(len(counts))], counts


def _signing_key(twin: Path, signing_key: Path | None) -> Ed25519PrivateKey | None:
    """The key that signs ``twin`` again: None for an unsigned twin; for a signed one,
    ``signing_key``, if the twin verifies against it."""
    if not (twin / SIGNATURE).exists():
        return None
    if signing_key is None:
        raise ValueError(
            f"{twin} is signed: give --signing-key to sign it again with the reader study "
            "in its manifest, or leave out --twin"
        )
    key = load_signing_key(signing_key)
    check = verify_twin(twin, key.public_key())
    if not check.ok:
        raise ValueError(f"{twin} does not verify; not signed again: {check.problems[0]}")
    return key
