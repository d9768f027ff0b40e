"""The consortium's Ed25519 signature over a twin's datasheet, and ``fedtwin verify``.

``manifest.json`` lists the sha256 of every file of the twin; ``manifest.sig`` holds an
Ed25519 signature over the exact bytes of ``manifest.json``. Verifying a twin checks the
signature (against the consortium's public key when one is given) and every file's hash,
and names each file that does not match.

Nothing outside the twin is trusted: a manifest may only list plain relative paths inside
the twin (never absolute, never ``..``), it must list the twin's data, and a twin holds
plain files and folders only: a symbolic link, or a file or folder the manifest does not
list, is a problem.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
REQUIRED_FILES = ("images.npz", "labels.csv")  # the twin's data (DESIGN.md's contract)
# A manifest lists about 100 bytes per file: 32 MiB is some 300k files, more than a catalog
# message holds. A larger manifest.json is not read.
MAX_MANIFEST_BYTES = 32 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_PATH, _MAX_PART = 1024, 255  # what common file systems allow


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
    key = _read_pem(path, lambda pem: serialization.load_pem_private_key(pem, password=None))
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = _read_pem(path, serialization.load_pem_public_key)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def _read_pem(path: Path, load):
    """``load`` applied to the PEM file ``path``; its errors name the file."""
    try:
        return load(Path(path).read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        why = "encrypted (fedtwin reads unencrypted keys)" if isinstance(e, TypeError) else "no key"
        raise ValueError(f"{path}: {why}; give the consortium's Ed25519 key in PEM form") from None


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


def check_twin_path(path: object) -> str:
    """A file path from a manifest: a plain relative ``/``-separated path inside the twin.

    Refused: absolute paths, ``.``, ``..`` and empty parts, backslashes, control characters,
    names too long for a file system, and ``manifest.json``/``manifest.sig`` themselves.
    """
    if not isinstance(path, str):
        raise ValueError(f"file {path!r}: a path must be a string")
    parts = path.split("/")
    if (
        not path
        or len(path) > _MAX_PATH
        or path.startswith("/")
        or "\\" in path
        or any(ord(c) < 32 or ord(c) == 127 for c in path)
        or any(part in ("", ".", "..") or len(part) > _MAX_PART for part in parts)
        or PurePosixPath(path).as_posix() != path
    ):
        raise ValueError(f"file {path!r}: not a plain relative path inside the twin")
    if path in (MANIFEST, SIGNATURE):
        raise ValueError(f"file {path!r}: the manifest cannot list itself or its signature")
    return path


def manifest_files(manifest: object) -> dict[str, str]:
    """The files a manifest lists, ``{path: sha256}``, after checking every entry.

    Raises ValueError naming the first entry that is not a plain path inside the twin
    (``check_twin_path``) with a lowercase hex sha256, a path listed both as a file and as a
    folder (``a`` and ``a/b``), or a manifest without the twin's data (``REQUIRED_FILES``).
    """
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("'files' must be an object {path: sha256}")
    for path, digest in files.items():
        check_twin_path(path)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"file {path!r}: sha256 must be 64 lowercase hex digits")
    for path in sorted(folders_of(files) & set(files)):
        raise ValueError(f"file {path!r}: listed both as a file and as a folder")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"'files' does not list the twin's {', '.join(missing)}")
    return files


def folders_of(paths: Iterable[str]) -> set[str]:
    """The folders that hold ``paths``: ``{"a", "a/b"}`` for ``a/b/c``."""
    return {p.rsplit("/", k)[0] for p in paths for k in range(1, p.count("/") + 1)}


def _walk(twin_dir: Path) -> tuple[set[str], set[str], list[str]]:
    """Plain files and folders under ``twin_dir`` (relative paths), and problems with anything
    else: symbolic links, special files, unreadable folders. Links are never followed."""
    files, folders, problems = set(), set(), []

    def unreadable(e: OSError) -> None:
        problems.append(f"{e.filename}: cannot be read ({e.strerror})")

    for root, dirs, names in os.walk(twin_dir, onerror=unreadable):
        for name in sorted(dirs + names):
            path = Path(root) / name
            rel = path.relative_to(twin_dir).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{rel}: a symbolic link; a twin holds plain files only")
            elif stat.S_ISDIR(mode):
                folders.add(rel)
            elif stat.S_ISREG(mode):
                files.add(rel)
            else:
                problems.append(f"{rel}: not a plain file; a twin holds plain files only")
    return files, folders, problems


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks: what the manifest lists for each file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_twin(twin_dir: Path, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check the signature over ``manifest.json``, the paths it lists and every file's sha256.

    With ``public_key`` (the consortium's) the signature must be made by that key. Without,
    it is checked against the key named in ``manifest.sig``: that proves the files are as
    signed, not who signed them, and a note says so.
    """
    twin_dir = Path(twin_dir)
    result = Verification()
    manifest_path, sig_path = twin_dir / MANIFEST, twin_dir / SIGNATURE
    if not twin_dir.is_dir():
        result.problems.append(f"{twin_dir}: no such folder")
        return result
    if not manifest_path.is_file():
        result.problems.append(f"{MANIFEST}: missing in {twin_dir}")
        return result
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        result.problems.append(f"{MANIFEST}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
        return result
    manifest_bytes = manifest_path.read_bytes()
    try:
        manifest = json.loads(manifest_bytes)
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        result.problems.append(f"{MANIFEST}: not valid JSON ({e})")
        manifest = {}

    gate = manifest.get("gate", {}) if isinstance(manifest, dict) else {}
    gate = gate if isinstance(gate, dict) else {}
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

    try:
        files = manifest_files(manifest)
    except ValueError as e:
        result.problems.append(f"{MANIFEST}: {e}")
        files = {}
    found, folders, problems = _walk(twin_dir)
    result.problems += problems
    for rel, digest in sorted(files.items()):
        if rel not in found:
            result.problems.append(f"{rel}: listed in the manifest but missing")
        elif sha256_file(twin_dir / rel) != digest:
            result.problems.append(f"{rel}: sha256 does not match the manifest")
        result.files_checked += 1
    for rel in sorted(found - set(files) - {MANIFEST, SIGNATURE}):
        result.problems.append(f"{rel}: not listed in the manifest")
    for rel in sorted(folders - folders_of(files)):
        result.problems.append(f"{rel}/: a folder the manifest does not list")
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
