"""The pooled reader study into a twin's manifest, signed again.

The study names its twin by the sha256 of the twin's images.npz, which the manifest lists,
so the figures go only into the manifest of the twin the readers read. A signed twin is
verified against the signing key before its manifest changes (a tampered twin is not signed
again), and signed again after; an unsigned twin stays unsigned.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtwin.jsonio import write_json
from fedtwin.signing import (
    MANIFEST,
    SIGNATURE,
    load_signing_key,
    manifest_files,
    sign_twin,
    verify_twin,
)


def attach(twin: Path, pooled: dict, signing_key: Path | None) -> None:
    try:
        manifest = json.loads((twin / MANIFEST).read_text())
        files = manifest_files(manifest)  # ValueError unless it lists images.npz
    except ValueError as e:
        raise ValueError(f"{twin / MANIFEST}: {e}") from None
    if files["images.npz"] != pooled["twin_images_sha256"]:
        raise ValueError(f"the readers read another twin than {twin} (its images.npz differs)")
    signed = (twin / SIGNATURE).exists()
    key = None
    if signed:
        if signing_key is None:
            raise ValueError(
                f"{twin} is signed: give --signing-key to sign it again with the reader study "
                "in its manifest, or leave out --twin"
            )
        key = load_signing_key(signing_key)
        check = verify_twin(twin, key.public_key())
        if not check.ok:
            raise ValueError(f"{twin} does not verify; not signed again: {check.problems[0]}")
    manifest["reader_study"] = {k: v for k, v in pooled.items() if k != "per_hospital"}
    write_json(twin / MANIFEST, manifest)
    if key is not None:
        sign_twin(twin, key)
