"""Hostile and careless input, round 2 (issue 32, items 8 and 9 and the manifest's paths): a
damaged reader study file is refused by `review summary` and `review serve` with one line
naming the file, the row and the field; a download cache that is a file, or that holds a
damaged file, says what to do; a twin's manifest holds no local path. Crafted files."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedtwin import medmnist
from fedtwin.cli import main as cli
from fedtwin.config import load_config
from fedtwin.data import DataError
from fedtwin.review.store import Study
from fedtwin.twin import write_twin

FIX = "restore it from a backup, or make a new study with another --db"


@pytest.fixture
def study(tmp_path, make_study) -> Path:
    """A small study in which reader ``r`` gave one reading."""
    path = make_study(tmp_path / "study.sqlite")
    s = Study(path)
    s.login("r")
    s.record("r", s.next_item("r")[0].token, True, 3, 0)
    return path


def _damage(path: Path, script: str) -> None:
    """Change ``path`` as a careless tool or an attacker would, past its CHECK constraints."""
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA ignore_check_constraints = ON")
        db.executescript(script)


DUPLICATE = """
ALTER TABLE readings RENAME TO kept;
CREATE TABLE readings (reader TEXT, item INTEGER, said_real INTEGER, realism INTEGER,
                       label INTEGER, at REAL);
INSERT INTO readings SELECT * FROM kept; INSERT INTO readings SELECT * FROM kept;
"""

DAMAGE = [  # (what is done to the file, what the error names)
    ("UPDATE study SET value = '[\"a\", \"a\"]' WHERE key = 'class_names'", "study.class_names"),
    ("UPDATE study SET value = 'not json' WHERE key = 'class_names'", "study.class_names"),
    ("UPDATE study SET value = '[\"a\", 7]' WHERE key = 'class_names'", "study.class_names"),
    ("UPDATE study SET value = '[]' WHERE key = 'class_names'", "study.class_names"),
    ("UPDATE study SET value = 'x' WHERE key = 'twin_images_sha256'", "study.twin_images_sha256"),
    ("UPDATE items SET label = 7 WHERE id = 1", "items row 1: label is 7"),
    ("UPDATE items SET label = -1 WHERE id = 1", "items row 1: label is -1"),
    ("UPDATE items SET label = 'a' WHERE id = 1", "items row 1: label is 'a'"),
    ("UPDATE items SET source = 'fake' WHERE id = 1", "items row 1: source is 'fake'"),
    ("UPDATE items SET png = 'text' WHERE id = 1", "items row 1: png"),
    ("UPDATE items SET label = 1 - label WHERE id = 1", "items: class"),
    ("UPDATE readers SET seed = 'x'", "readers row 1: seed is 'x'"),
    ("UPDATE readings SET realism = 9", "readings row 1: realism is 9"),
    ("UPDATE readings SET realism = 2.5", "readings row 1: realism is 2.5"),
    ("UPDATE readings SET said_real = 3", "readings row 1: said_real is 3"),
    ("UPDATE readings SET label = 5", "readings row 1: label is 5"),
    ("UPDATE readings SET item = 99", "readings row 1: item is 99"),
    ("UPDATE readings SET reader = ''", "readings row 1: reader"),
    (DUPLICATE, "readings: reader 'r' read item"),
]


@pytest.mark.parametrize("script, field", DAMAGE)
def test_summary_refuses_a_damaged_study_naming_the_row_and_field(
    study, tmp_path, capsys, script, field
):
    _damage(study, script)
    out = tmp_path / "summary.json"
    assert cli(["review", "summary", "--db", str(study), "--hospital", "h", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{study}: damaged reader study: {field}" in err and FIX in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("script, field", DAMAGE[::3])
def test_serve_refuses_a_damaged_study_before_it_serves(study, capsys, monkeypatch, script, field):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served a damaged study"))
    _damage(study, script)
    assert cli(["review", "serve", "--db", str(study)]) == 2
    err = capsys.readouterr().err
    assert f"{study}: damaged reader study: {field}" in err and "Traceback" not in err


def test_an_undamaged_study_is_summarised(study, tmp_path):
    out = tmp_path / "summary.json"
    assert cli(["review", "summary", "--db", str(study), "--hospital", "h", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["per_class"]["a"]["real"]["readings"] in (0, 1)


@pytest.mark.parametrize("names", [["a", "a"], ["a", ""], ["a\nb", "c"], []])
def test_a_study_of_class_names_no_study_could_keep_is_not_made(tmp_path, names):
    images, labels = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 0, 1])
    path = tmp_path / "study.sqlite"
    with pytest.raises(ValueError, match="class names"):
        Study.create(path, (images, labels), (images, labels), names, 4, 0, "0" * 64)
    assert not path.exists()


@pytest.mark.parametrize("name", ["", "h\x00", "x" * 101])
def test_summary_refuses_a_hospital_name_the_pool_would_refuse(study, tmp_path, capsys, name):
    out = tmp_path / "summary.json"
    with pytest.raises(SystemExit):
        cli(["review", "summary", "--db", str(study), "--hospital", name, "--out", str(out)])
    assert "argument --hospital" in capsys.readouterr().err and not out.exists()


@pytest.fixture
def source(tmp_path) -> tuple[dict, bytes]:
    """A 'tiny' dataset's data section whose file is served from a file:// URL, and the file."""
    src = tmp_path / "src" / "tiny.npz"
    src.parent.mkdir()
    np.savez(src, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(2, int))
    url, md5 = src.as_uri(), hashlib.md5(src.read_bytes()).hexdigest()
    data = {"name": "tiny", "path": None, "cache_dir": None, "image_size": 28,
            "sources": {28: {"url": url, "md5": md5}}}  # fmt: skip
    return data, src.read_bytes()


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_download_cache_that_is_a_file_says_so(source, tmp_path, monkeypatch, below):
    blocked = tmp_path / "file"
    blocked.write_text("mine")
    monkeypatch.setenv("FEDTWIN_CACHE", str(blocked / below) if below else str(blocked))
    with pytest.raises(DataError) as e:
        medmnist.resolve_data_path(source[0], progress=False)
    message = str(e.value)
    assert "FEDTWIN_CACHE" in message and "data.path=" in message and ".part" not in message
    assert ("is a file, not a folder" if not below else "Not a directory") in message
    assert blocked.read_text() == "mine"


def test_a_damaged_cached_download_is_named_and_what_to_do_is_said(source, tmp_path):
    data, good = source
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.npz").write_bytes(b"half a download")
    offline = {**data, "sources": {28: {**data["sources"][28], "url": "file:///nowhere/x.npz"}}}
    with pytest.raises(DataError) as e:
        medmnist.download(offline, cache, progress=False)
    message = str(e.value)
    assert f"The file already at {cache / 'tiny.npz'} is not the published one" in message
    assert "remove it, then put the MedMNIST file" in message
    assert "Put the MedMNIST file at" not in message  # where the damaged one already is
    assert medmnist.download(data, cache, progress=False).read_bytes() == good  # online: fixed


def test_a_manifest_holds_no_local_path(tmp_path):
    cfg = load_config([])
    cfg["data"].update(path="/srv/hospital/pneumonia.npz", cache_dir="/var/cache/fedtwin")
    cfg["twin"]["signing_key"] = "/home/operator/keys/consortium-signing.pem"
    cfg["data"]["sources"][28]["url"] = "file:///srv/mirror/pneumoniamnist.npz"
    images, labels = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 0, 1])
    manifest_path = write_twin(tmp_path / "twin", images, labels, class_names=["a", "b"],
                               provenance={"config": cfg}, dicom=False)  # fmt: skip
    text = manifest_path.read_text()
    assert not any(p in text for p in ("/srv", "/var/cache", "/home/operator")), text
    recorded = json.loads(text)["config"]
    assert recorded["data"]["path"] == "pneumonia.npz"
    assert recorded["twin"]["signing_key"] == "consortium-signing.pem"
    assert recorded["data"]["classes"] == cfg["data"]["classes"]  # the rest as it was
    assert cfg["data"]["path"] == "/srv/hospital/pneumonia.npz"  # the run's own config kept
