"""The signed datasheet: ``fedtwin verify`` passes on a fresh twin and names every changed
file; the gate signs only twins that passed the audit or were overridden on the record."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from fedtwin.cli import main
from fedtwin.config import load_config
from fedtwin.gate import write_gated_twin
from fedtwin.signing import (
    load_public_key,
    make_signing_key,
    public_key_path,
    sign_twin,
    verify_twin,
)
from fedtwin.twin import sha256_file, write_twin


@pytest.fixture
def key_path(tmp_path):
    path = tmp_path / "keys" / "signing.pem"
    make_signing_key(path)
    return path


def small_twin(out, n: int = 6):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 2, n)
    write_twin(
        out,
        images,
        labels,
        class_names=["normal", "pneumonia"],
        provenance={"gate": {"audit_verdict": "pass", "signed": True, "override": None}},
        documents={"audit.json": {"verdict": "pass"}},
    )
    return out


def flip_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_key_is_private_and_never_overwritten(key_path):
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert public_key_path(key_path).is_file()
    before = key_path.read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        make_signing_key(key_path)
    assert key_path.read_bytes() == before


def test_fresh_twin_verifies(tmp_path, key_path):
    from fedtwin.signing import load_signing_key

    twin = small_twin(tmp_path / "twin")
    sign_twin(twin, load_signing_key(key_path))
    result = verify_twin(twin, load_public_key(public_key_path(key_path)))
    assert result.ok, result.problems
    assert result.files_checked == 6 + 3  # dicom files, images.npz, labels.csv, audit.json
    assert main(["verify", str(twin), "--public-key", str(public_key_path(key_path))]) == 0


@pytest.mark.parametrize(
    "target",
    [
        "images.npz",
        "labels.csv",
        "dicom/twin-000003.dcm",
        "audit.json",
        "manifest.json",
        "manifest.sig",
    ],
)
def test_any_changed_byte_fails_and_names_the_file(tmp_path, key_path, target, capsys):
    from fedtwin.signing import load_signing_key

    twin = small_twin(tmp_path / "twin")
    sign_twin(twin, load_signing_key(key_path))
    flip_byte(twin / target)
    trusted = load_public_key(public_key_path(key_path))
    for key in (trusted, None):  # with the consortium's key, and with the embedded one
        result = verify_twin(twin, key)
        assert not result.ok
        assert any(p.startswith(target) or target in p for p in result.problems), result.problems
    assert main(["verify", str(twin)]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_signature_by_another_key_is_refused(tmp_path, key_path):
    from fedtwin.signing import load_signing_key

    twin = small_twin(tmp_path / "twin")
    other = make_signing_key(tmp_path / "other.pem")
    sign_twin(twin, other)
    assert verify_twin(twin).ok  # consistent in itself ...
    result = verify_twin(twin, load_public_key(public_key_path(key_path)))
    assert not result.ok and "not by the trusted key" in result.problems[0]
    # ... and an added file is named too
    (twin / "extra.txt").write_text("x")
    sign_twin(twin, load_signing_key(key_path))
    assert any("extra.txt" in p for p in verify_twin(twin).problems)


def gated(tmp_path, verdict: str, override, *overrides: str):
    cfg = load_config([f"twin.signing_key={tmp_path / 'keys' / 'signing.pem'}", *overrides])
    cfg["audit"]["override"] = override
    cfg["twin"]["dicom"] = False
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.array([0, 1, 0, 1])
    audit = {
        "verdict": verdict,
        "checks": [{"check": "near copies", "value": 3, "rule": "<= 0", "passed": False}],
        "mia": {},
        "near_copies": {"near_copies": 3},
        "sample_sizes": {},
        "notes": [],
        "not_audited": {"hospitals": [], "nodes": []},
    }
    history = [{"round": 1, "hospitals": {"hospital-0": {"epsilon": 1.0}}}]
    utility = {"auc": 0.5, "acc": 0.5, "n": 10, "per_hospital": {}}
    gate = write_gated_twin(tmp_path, cfg, images, labels, audit, utility, history, [1])
    return gate, tmp_path / "twin"


def test_the_manifest_names_an_over_sampled_class(tmp_path, key_path):
    gate, twin = gated(tmp_path, "pass", None, "+twin.class_weights.pneumonia=2.5")
    manifest = json.loads((twin / "manifest.json").read_text())
    assert manifest["label_mix"] == {"mode": "federation", "over_sampled": {"pneumonia": 2.5}}
    _, plain = gated(tmp_path / "plain", "fail", None)
    assert json.loads((plain / "manifest.json").read_text())["label_mix"]["over_sampled"] == {}


def test_failed_audit_is_not_signed(tmp_path, key_path, capsys):
    gate, twin = gated(tmp_path, "fail", None)
    assert gate == {"audit_verdict": "fail", "signed": False, "override": None}
    assert not (twin / "manifest.sig").exists()
    result = verify_twin(twin)
    assert not result.ok and "not signed (audit verdict: fail)" in result.problems[0]
    assert main(["verify", str(twin)]) == 1


def test_override_is_signed_recorded_and_reported(tmp_path, key_path, capsys):
    reason = "ethics board approved, ticket 42"
    gate, twin = gated(tmp_path, "fail", reason)
    assert gate["signed"] and gate["override"] == reason
    manifest = json.loads((twin / "manifest.json").read_text())
    assert manifest["gate"]["override"] == reason
    result = verify_twin(twin, load_public_key(public_key_path(key_path)))
    assert result.ok and any(reason in n for n in result.notes)
    assert main(["verify", str(twin)]) == 0
    assert reason in capsys.readouterr().out


def test_twin_dataset_loads_a_verified_twin_and_refuses_a_changed_one(tmp_path, key_path):
    from fedtwin import TwinDataset
    from fedtwin.signing import load_signing_key

    twin = small_twin(tmp_path / "twin")
    sign_twin(twin, load_signing_key(key_path))
    ds = TwinDataset(twin, public_key=load_public_key(public_key_path(key_path)))
    image, label = ds[5]
    with np.load(twin / "images.npz") as data:
        assert np.array_equal((image[0] * 255).round().numpy(), data["train_images"][5])
        assert label == int(data["train_labels"][5, 0])
    flip_byte(twin / "labels.csv")
    with pytest.raises(ValueError, match="labels.csv"):
        TwinDataset(twin)
    assert len(TwinDataset(twin, verify=False)) == 6


def signed_listing(twin, key_path, files: dict) -> None:
    """Replace ``twin``'s manifest by one listing ``files`` ({path: sha256}), and sign it."""
    from fedtwin.signing import load_signing_key

    manifest = json.loads((twin / "manifest.json").read_text())
    (twin / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    sign_twin(twin, load_signing_key(key_path))


def listed(twin) -> dict:
    return json.loads((twin / "manifest.json").read_text())["files"]


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_paths_outside_the_twin_are_refused(tmp_path, key_path, where, capsys):
    from fedtwin import TwinDataset

    twin = small_twin(tmp_path / "twin")
    outside = tmp_path / "outside.txt"
    outside.write_text("a file the twin does not hold\n")
    path = "../outside.txt" if where == "parent" else str(outside)
    signed_listing(twin, key_path, listed(twin) | {path: sha256_file(outside)})
    result = verify_twin(twin, load_public_key(public_key_path(key_path)))
    assert not result.ok and any("not a plain relative path" in p for p in result.problems)
    assert main(["verify", str(twin)]) == 1
    assert path in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a plain relative path"):
        TwinDataset(twin)


def test_folder_with_only_a_signed_manifest_does_not_verify(tmp_path, key_path):
    twin = tmp_path / "empty-twin"
    twin.mkdir()
    (twin / "manifest.json").write_text(json.dumps({"kind": "fedtwin synthetic twin"}))
    signed_listing(twin, key_path, {})
    result = verify_twin(twin, load_public_key(public_key_path(key_path)))
    assert not result.ok and "images.npz, labels.csv" in result.problems[0]


def test_symbolic_links_and_extra_folders_are_problems(tmp_path, key_path):
    twin = small_twin(tmp_path / "twin")
    signed_listing(twin, key_path, listed(twin))
    outside = tmp_path / "audit-copy.json"
    outside.write_bytes((twin / "audit.json").read_bytes())
    (twin / "audit.json").unlink()
    (twin / "audit.json").symlink_to(outside)  # same bytes, but not inside the twin
    (twin / "empty-folder").mkdir()
    (twin / "elsewhere").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(twin / "pipe")  # would block a reader forever: never opened
    signed_listing(twin, key_path, listed(twin) | {"pipe": "0" * 64})
    problems = verify_twin(twin, load_public_key(public_key_path(key_path))).problems
    assert "audit.json: a symbolic link; a twin holds plain files only" in problems
    assert "elsewhere: a symbolic link; a twin holds plain files only" in problems
    assert "empty-folder/: a folder the manifest does not list" in problems
    assert "pipe: not a plain file; a twin holds plain files only" in problems
