"""The gate between an audited twin and a published one, free of any framework: the
federation's label counts and ε per hospital as the server knows them, and the twin
written with its manifest and signed only if the audit passed (or an operator's recorded
override says so)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtwin.audit_pool import summary
from fedtwin.config import class_weights
from fedtwin.quality import federated_quality
from fedtwin.signing import load_signing_key, make_signing_key, sign_twin
from fedtwin.twin import write_twin


def label_counts(history: list[dict], n_classes: int) -> np.ndarray:
    """The federation's class counts as the server knows them: each hospital's noisy class
    shares (from its last round) times its number of training images."""
    latest: dict[str, dict] = {}
    for entry in history:
        latest.update(entry["hospitals"])
    counts = np.zeros(n_classes)
    for m in latest.values():
        counts += np.asarray(m["label-shares"], dtype=float) * float(m["num-examples"])
    if counts.sum() <= 0:
        raise RuntimeError("no hospital reported class shares: cannot choose the twin's labels")
    return counts


def final_epsilons(history: list[dict]) -> dict[str, float]:
    """Each hospital's epsilon after the last round it took part in."""
    eps: dict[str, float] = {}
    for entry in history:
        for name, m in entry["hospitals"].items():
            eps[name] = float(m["epsilon"])
    return eps


def consortium_key(cfg: Mapping[str, Any], out: Path) -> tuple[Ed25519PrivateKey, Path, bool]:
    """The consortium's signing key from ``twin.signing_key``; without one, a key made once
    under ``out/keys`` (fine for a demo, not for a consortium). Returns the key, its file
    and whether it was made now."""
    path = cfg["twin"].get("signing_key")
    if path:
        return load_signing_key(Path(path)), Path(path), False
    path = Path(out) / "keys" / "consortium-signing.pem"
    if path.exists():
        return load_signing_key(path), path, False
    return make_signing_key(path), path, True


def write_gated_twin(
    out: Path,
    cfg: dict,
    images: np.ndarray,
    labels: np.ndarray,
    audit: dict,
    utility: dict,
    history: list[dict],
    generator_rounds: list[int],
    key: Callable[[], Ed25519PrivateKey] | None = None,
) -> dict[str, Any]:
    """Write ``out/twin`` with ``audit.json`` and the manifest; sign it only if the audit
    passed or ``audit.override`` gives the operator's reason (recorded in the manifest).
    ``key`` gives the signing key when one is needed (default: ``consortium_key``).
    Returns the gate: audit verdict, signed, override."""
    classes, tw, au = list(cfg["data"]["classes"]), cfg["twin"], cfg["audit"]
    missing = audit["not_audited"]["hospitals"]
    override = au.get("override")
    passed = audit["verdict"] == "pass"
    gate = {
        "audit_verdict": audit["verdict"],
        "signed": passed or bool(override),
        "override": None if passed else override,
    }
    dp = bool(cfg["privacy"]["enabled"])
    twin_dir = out / "twin"
    write_twin(
        twin_dir,
        images,
        labels,
        class_names=classes,
        provenance={
            "config": cfg,
            "rounds_completed": max((e["round"] for e in history), default=0),
            "generator_rounds": generator_rounds,  # the global models that made the twin
            "privacy": {
                "dp": dp,
                "delta": float(cfg["privacy"]["delta"]),
                "epsilon_per_hospital": final_epsilons(history),
                "unit": "one image (sample-level DP); no patient-level claim",
                "note": None if dp else "DP off: epsilon = inf, no privacy guarantee",
            },
            "source_data": {"name": cfg["data"]["name"]},
            "label_mix": {  # how the twin's labels were drawn; over-sampled classes named
                "mode": tw["label_mix"],
                "over_sampled": {
                    c: w for c, w in zip(classes, class_weights(cfg), strict=True) if w != 1
                },
            },
            "audit": {**summary(audit), "not_audited": missing},
            "federated_utility": {
                "classifier": "trained on the twin only, scored on every hospital's holdout",
                **utility,
            },
            "gate": gate,
            "quality": federated_quality(utility, cfg["eval"]),  # says, decides nothing
        },
        documents={"audit.json": audit},
        dicom=bool(tw["dicom"]),
    )
    if gate["signed"]:
        sign_twin(twin_dir, key() if key is not None else consortium_key(cfg, out)[0])
    return gate
