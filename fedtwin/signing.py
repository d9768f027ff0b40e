"""The consortium's Ed25519 signature over a twin's datasheet, and ``fedtwin verify``.

``manifest.json`` lists the sha256 of every file of the twin; ``manifest.sig`` holds an
Ed25519 signature over the exact bytes of ``manifest.json``. Verifying a twin checks the
signature (against the consortium's public key when one is given) and every file's hash,
and names each file that does not match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only; never overwrite one that exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path} exists; fedtwin never overwrites a key. Move it away first if you "
            f"really mean to replace it"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_signing_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key in ``path`` (PEM, mode 0600) and its public key in ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(Path(path), pem)
    public_key_path(path).write_bytes(public_pem(key.public_key()))
    return key


def public_key_path(private_path: Path) -> Path:
    return Path(str(private_path) + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _signature_document(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    doc = {
        "algorithm": "Ed25519",
        "signed_file": MANIFEST,
        "public_key": base64.b64encode(raw).decode(),
        "key_fingerprint": fingerprint(public),
        "signature": base64.b64encode(key.sign(manifest)).decode(),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def sign_twin(twin_dir: Path, key: Ed25519PrivateKey) -> Path:
    """Sign ``twin_dir/manifest.json``; writes ``manifest.sig``."""
    twin_dir = Path(twin_dir)
    path = twin_dir / SIGNATURE
    path.write_bytes(_signature_document(key, (twin_dir / MANIFEST).read_bytes()))
    return path


@dataclass
class Verification:
    """What ``verify_twin`` found: ``problems`` empty means the twin checks out."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_twin(twin_dir: Path, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check the signature over ``manifest.json`` and every file's sha256.

    With ``public_key`` (the consortium's) the signature must be made by that key. Without,
    it is checked against the key named in ``manifest.sig``: that proves the files are as
    signed, not who signed them, and a note says so.
    """
    from fedtwin.twin import sha256_file

    twin_dir = Path(twin_dir)
    result = Verification()
    manifest_path, sig_path = twin_dir / MANIFEST, twin_dir / SIGNATURE
    if not manifest_path.is_file():
        result.problems.append(f"{MANIFEST}: missing in {twin_dir}")
        return result
    manifest_bytes = manifest_path.read_bytes()
    try:
        manifest = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        result.problems.append(f"{MANIFEST}: not valid JSON ({e})")
        manifest = {}

    gate = manifest.get("gate", {}) if isinstance(manifest, dict) else {}
    if not sig_path.is_file():
        verdict = gate.get("audit_verdict", "unknown")
        result.problems.append(
            f"{SIGNATURE}: missing — this twin was not signed (audit verdict: {verdict})"
        )
    else:
        problems, notes = check_signature(sig_path.read_bytes(), manifest_bytes, public_key)
        result.problems += problems
        result.notes += notes
    if gate.get("override"):
        result.notes.append(
            f"published although the audit failed: operator override "
            f"({gate['override']!r}); see audit.json"
        )

    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    for rel, digest in sorted(files.items()):
        path = twin_dir / rel
        if not path.is_file():
            result.problems.append(f"{rel}: listed in the manifest but missing")
        elif sha256_file(path) != digest:
            result.problems.append(f"{rel}: sha256 does not match the manifest")
        result.files_checked += 1
    for path in sorted(p for p in twin_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(twin_dir).as_posix()
        if rel not in files and rel not in (MANIFEST, SIGNATURE):
            result.problems.append(f"{rel}: not listed in the manifest")
    return result


def check_signature(
    raw: bytes, manifest: bytes, trusted: Ed25519PublicKey | None
) -> tuple[list[str], list[str]]:
    """Problems and notes for signature document ``raw`` (manifest.sig) over ``manifest``."""
    problems = _signature_problems(raw, manifest, trusted)
    if problems or trusted is not None:
        return problems, []
    return [], [
        f"signature checked against the key in {SIGNATURE} ({signer(raw)}); "
        f"pass --public-key with the consortium's key to check who signed it"
    ]


def signer(raw: bytes) -> str:
    """The key fingerprint a signature document names ("" if unreadable)."""
    try:
        return str(json.loads(raw).get("key_fingerprint", ""))
    except (ValueError, AttributeError, UnicodeDecodeError):
        return ""


def _signature_problems(raw: bytes, manifest: bytes, trusted: Ed25519PublicKey | None) -> list[str]:
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        embedded = Ed25519PublicKey.from_public_bytes(base64.b64decode(doc["public_key"]))
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{SIGNATURE}: unreadable ({e})"]
    if doc.get("algorithm") != "Ed25519" or doc.get("signed_file") != MANIFEST:
        return [f"{SIGNATURE}: expected an Ed25519 signature of {MANIFEST}"]
    if doc.get("key_fingerprint") != fingerprint(embedded):
        return [f"{SIGNATURE}: key fingerprint does not match its public key"]
    if (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode() != raw:
        return [f"{SIGNATURE}: not in the form fedtwin writes (altered?)"]
    if trusted is not None and fingerprint(trusted) != fingerprint(embedded):
        return [
            f"{SIGNATURE}: signed by {fingerprint(embedded)}, not by the trusted key "
            f"{fingerprint(trusted)}"
        ]
    try:
        (trusted or embedded).verify(signature, manifest)
    except InvalidSignature:
        return [f"{MANIFEST}: the signature does not verify (the manifest was changed)"]
    return []
