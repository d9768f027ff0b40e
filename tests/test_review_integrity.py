"""Nothing false is signed (issue 32, items 1-3): `fedtwin review pool` refuses summaries no
study can give, or of another twin, and writes nothing when it refuses; `review serve` makes
no study of another dataset's archive; `TwinDataset` says when no key says who signed a twin.
Crafted files through the real commands, and a property test of the pool over generated
summaries."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fedtwin.cli import main as cli
from fedtwin.config import load_config
from fedtwin.review.stats import FORMAT, MAX_COUNT, SOURCES
from fedtwin.signing import make_signing_key, public_key_path, sha256_file, sign_twin
from fedtwin.twin import TwinDataset, UntrustedTwinWarning, write_twin

CLASSES = ["normal", "pneumonia"]
PER_CLASS = 20  # the twin's images of each class


@pytest.fixture(scope="module")
def signed_twin(tmp_path_factory) -> dict:
    """A signed two-class grey 28 x 28 twin (20 images a class) and its key."""
    root = tmp_path_factory.mktemp("integrity")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2 * PER_CLASS, 28, 28), dtype=np.uint8)
    labels = np.repeat([0, 1], PER_CLASS)
    write_twin(root / "twin", images, labels, class_names=CLASSES,
               provenance={"config": load_config([])}, dicom=False)  # fmt: skip
    key = make_signing_key(root / "signing.pem")
    sign_twin(root / "twin", key)
    return {"twin": root / "twin", "key": root / "signing.pem",
            "sha": sha256_file(root / "twin" / "images.npz")}  # fmt: skip


@pytest.fixture
def twin(signed_twin, tmp_path) -> Path:
    """A copy of the signed twin this test may change."""
    return Path(shutil.copytree(signed_twin["twin"], tmp_path / "twin"))


def summary(rng, sha: str, hospital: str = "hospital-0", classes=CLASSES) -> dict:
    """What `fedtwin review summary` writes for a study a hospital could have run: up to 3
    real and as many twin images a class, each of up to 4 readers reading some of them."""
    shown = [int(rng.integers(0, 4)) for _ in classes]
    shown[int(rng.integers(len(classes)))] += 1  # a study shows at least one pair
    per_class = {c: {s: _cell([]) for s in SOURCES} for c in classes}
    readers = 0
    for _ in range(int(rng.integers(0, 5))):
        images = [(c, s) for c, n in zip(classes, shown, strict=True) for s in SOURCES
                  for _ in range(n)]  # fmt: skip
        read = [image for image in images if rng.random() < 0.6]
        readers += bool(read)  # a study counts the readers who gave a reading
        for c, s in read:
            _add(per_class[c][s], rng)
    return {"format": FORMAT, "hospital": hospital, "twin_images_sha256": sha,
            "class_names": list(classes), "readers": readers,
            "images": {"real": sum(shown), "twin": sum(shown)}, "per_class": per_class}  # fmt: skip


def _cell(realism: list[int]) -> dict:
    return {"readings": sum(realism), "called_real": 0, "realism": realism or [0] * 5,
            "label_agreed": 0}  # fmt: skip


def _add(cell: dict, rng) -> None:
    cell["readings"] += 1
    cell["called_real"] += int(rng.integers(2))
    cell["label_agreed"] += int(rng.integers(2))
    cell["realism"][int(rng.integers(5))] += 1


def pool(tmp_path, summaries: list, *extra: str) -> tuple[int, str, Path]:
    """`fedtwin review pool` over ``summaries`` (dicts, or JSON text) written to
    ``hospital-<i>-review.json``: its exit status and the --out it was given."""
    files = []
    for i, s in enumerate(summaries):
        files.append(tmp_path / f"hospital-{i}-review.json")
        files[-1].write_text(s if isinstance(s, str) else json.dumps(s))
    out = tmp_path / "pooled" / "reader-study.json"
    out.parent.mkdir(exist_ok=True)
    return cli(["review", "pool", *map(str, files), "--out", str(out), *extra]), out


def snapshot(twin: Path) -> dict:
    return {p.name: p.read_bytes() for p in twin.iterdir() if p.is_file()}


def refused(capsys, out: Path, *words: str) -> str:
    """The one-line error of a refused command that wrote nothing beside ``out``."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    assert all(w in err for w in words), (words, err)
    assert not out.exists() and not out.with_suffix(".html").exists()
    return err


# 1. `fedtwin review pool`: every claim checked against itself and against the twin


def _read(agg: dict, readers: int, images: int, readings: dict) -> None:
    """Set ``agg``'s readers, images (of each source) and readings per (class, source)."""
    agg.update(readers=readers, images={"real": images, "twin": images})
    for c in CLASSES:
        for s in SOURCES:
            agg["per_class"][c][s] = _cell([readings.get((c, s), 0), 0, 0, 0, 0])


def _four_billion_readings(agg):
    _read(agg, 1, 1, {("normal", "real"): 4 * 10**9})


def _readings_without_readers(agg):
    _read(agg, 0, 2, {("normal", "twin"): 3})


def _classes_not_the_twins(agg):
    _read(agg, 2, 2, {("normal", "twin"): 3})
    agg["class_names"] = ["grade-0", "grade-1"]
    agg["per_class"] = dict(zip(agg["class_names"], agg["per_class"].values(), strict=True))


def _more_twin_images_than_the_twin_has(agg):
    _read(agg, 2, 3 * PER_CLASS, {("normal", "twin"): 3})


def _more_readings_of_a_class_than_its_twin_images_allow(agg):
    _read(agg, 1, 2 * PER_CLASS, {("normal", "twin"): PER_CLASS + 1})


def _more_readings_than_readers_can_give(agg):
    _read(agg, 2, 3, {("normal", "real"): 4, ("pneumonia", "twin"): 3})  # needs 2 + 2 pairs


IMPOSSIBLE = {  # case: (how the summary is made impossible, the field the error names)
    "4e9 readings, 1 reader, 1 + 1 images": (_four_billion_readings, "per_class"),
    "readings, 0 readers": (_readings_without_readers, "'readers'"),
    "class names not the twin's": (_classes_not_the_twins, "class_names"),
    "more twin images than the twin": (_more_twin_images_than_the_twin_has, "'images'"),
    "a class read more than its twin images allow": (
        _more_readings_of_a_class_than_its_twin_images_allow,
        "per_class.normal",
    ),
    "more readings than readers x images": (_more_readings_than_readers_can_give, "per_class"),
}


@pytest.mark.parametrize("case", IMPOSSIBLE)
def test_pool_refuses_an_impossible_summary_and_writes_nothing(signed_twin, twin, tmp_path, capsys,
                                                                case):  # fmt: skip
    make_impossible, field = IMPOSSIBLE[case]
    rng = np.random.default_rng(1)
    good = summary(rng, signed_twin["sha"], "hospital-1")
    bad = summary(rng, signed_twin["sha"], "hospital-0")
    make_impossible(bad)
    before = snapshot(twin)
    rc, out = pool(tmp_path, [bad, good], "--twin", str(twin), "--signing-key",
                   str(signed_twin["key"]))  # fmt: skip
    assert rc == 2
    refused(capsys, out, "hospital-0-review.json", field)
    assert snapshot(twin) == before  # neither the manifest nor its signature changed


def test_pool_refuses_a_count_too_large_for_a_float(tmp_path, capsys):
    agg = summary(np.random.default_rng(2), "ab" * 32)
    text = json.dumps(agg).replace(f'"readers": {agg["readers"]}', '"readers": 1' + "0" * 400)
    rc, out = pool(tmp_path, [text])
    assert rc == 2
    refused(capsys, out, "hospital-0-review.json", "'readers' must be a count")


def test_pool_checks_the_signing_key_before_it_writes_anything(signed_twin, twin, tmp_path,
                                                               capsys):  # fmt: skip
    aggs = [summary(np.random.default_rng(3), signed_twin["sha"])]
    before = snapshot(twin)
    make_signing_key(tmp_path / "other.pem")
    rc, out = pool(
        tmp_path, aggs, "--twin", str(twin), "--signing-key", str(tmp_path / "other.pem")
    )
    assert rc == 2
    refused(capsys, out, "not by the trusted key")
    (tmp_path / "garbage.pem").write_text("not a key\n")
    rc, out = pool(
        tmp_path, aggs, "--twin", str(twin), "--signing-key", str(tmp_path / "garbage.pem")
    )
    assert rc == 2
    refused(capsys, out, "garbage.pem", "PEM")
    rc, out = pool(tmp_path, aggs, "--twin", str(twin))
    assert rc == 2
    refused(capsys, out, "--signing-key")
    assert snapshot(twin) == before
    rc, out = pool(tmp_path, aggs, "--twin", str(twin), "--signing-key", str(signed_twin["key"]))
    assert rc == 0 and out.exists() and snapshot(twin) != before  # the right key: recorded


# the property: a pool is accepted exactly when every summary is one a study can give


def possible(agg: dict, twin_classes: dict) -> bool:
    """The invariants, stated directly: whole counts in range; per cell, called real and
    label agreed <= readings = the realism histogram's sum; as many real as twin images, at
    least one; readers <= readings, none without readers; each class's readings of a source
    <= readers x its images of that source, for some images per class that add up to the
    study's and that the twin holds (``twin_classes``: name -> images)."""

    def count(v):
        return type(v) is int and 0 <= v <= MAX_COUNT

    cells = [agg["per_class"][c][s] for c in agg["class_names"] for s in SOURCES]
    if not (count(agg["readers"]) and all(count(v) for v in agg["images"].values())):
        return False
    if not all(count(c[k]) for c in cells for k in ("readings", "called_real", "label_agreed")):
        return False
    if not all(count(v) for c in cells for v in c["realism"]):
        return False
    if any(max(c["called_real"], c["label_agreed"]) > c["readings"] for c in cells):
        return False
    if any(sum(c["realism"]) != c["readings"] for c in cells):
        return False
    images, readers = agg["images"]["real"], agg["readers"]
    total = sum(c["readings"] for c in cells)
    if agg["images"]["twin"] != images or images < 1 or total < readers or (total and not readers):
        return False
    if agg["class_names"] != list(twin_classes) or images > sum(twin_classes.values()):
        return False
    fewest = {  # the fewest images of class c that R readers can have read r times
        c: max(
            math.ceil(Fraction(agg["per_class"][c][s]["readings"], readers or 1)) for s in SOURCES
        )  # fmt: skip
        for c in agg["class_names"]
    }
    return sum(fewest.values()) <= images and all(fewest[c] <= twin_classes[c] for c in fewest)


def mutate(agg: dict, rng) -> None:
    """One change, often one that no study could give, sometimes a harmless one."""
    cell = agg["per_class"][CLASSES[int(rng.integers(2))]][SOURCES[int(rng.integers(2))]]
    value = [-1, 0, 1, 2, 5, 40, 10**9, 10**9 + 1, 1.0, True, "3", None][int(rng.integers(12))]
    kind = int(rng.integers(6))
    if kind == 0:
        agg["readers"] = value
    elif kind == 1:
        agg["images"][SOURCES[int(rng.integers(2))]] = value
    elif kind == 2:
        cell[["readings", "called_real", "label_agreed"][int(rng.integers(3))]] = value
    elif kind == 3:
        cell["realism"][int(rng.integers(5))] = value
    elif kind == 4:  # more readings, histogram kept in step: only the bounds can tell
        extra = int(rng.choice([1, 3, 10, 4 * 10**9]))
        cell["readings"] += extra
        cell["realism"][int(rng.integers(5))] += extra
    else:
        n = int(rng.integers(0, 3 * PER_CLASS))
        agg["images"] = {"real": n, "twin": n}


def test_pool_accepts_exactly_the_summaries_a_study_can_give(signed_twin, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(signed_twin["twin"], twin)
    (twin / "manifest.sig").unlink()  # unsigned: each accepted pool is recorded, unsigned
    twin_classes = dict.fromkeys(CLASSES, PER_CLASS)
    rng = np.random.default_rng(32)
    accepted = refused_count = 0
    for case in range(150):
        aggs = [
            summary(rng, signed_twin["sha"], f"hospital-{i}") for i in range(rng.integers(1, 4))
        ]
        for _ in range(int(rng.integers(0, 3))):
            mutate(aggs[int(rng.integers(len(aggs)))], rng)
        expected = all(possible(a, twin_classes) for a in aggs)
        before = snapshot(twin)
        rc, out = pool(tmp_path, copy.deepcopy(aggs), "--twin", str(twin))
        assert rc == (0 if expected else 2), (case, aggs, capsys.readouterr().err)
        if rc:
            refused(capsys, out, "review.json")
            assert snapshot(twin) == before
            refused_count += 1
            continue
        capsys.readouterr()
        pooled = json.loads(out.read_text())
        readings = pooled["all"]["readings"]
        images = pooled["images"]
        assert pooled["readers"] == sum(a["readers"] for a in aggs)
        assert (
            pooled["readers"] <= readings <= pooled["readers"] * (images["real"] + images["twin"])
        )
        assert readings == sum(f["readings"] for f in pooled["per_class"].values())
        assert (
            json.loads((twin / "manifest.json").read_text())["reader_study"]["all"] == pooled["all"]
        )
        out.unlink()
        out.with_suffix(".html").unlink()
        accepted += 1
    assert accepted > 30 and refused_count > 30  # both sides of the property were tried


# 2. `fedtwin review serve --data`: the archive must be of the twin's dataset


def test_serve_refuses_an_archive_of_another_dataset(signed_twin, retina_path, tmp_path):
    db = tmp_path / "study.sqlite"
    cmd = [sys.executable, "-m", "fedtwin.cli", "review", "serve", "--db", str(db),
           "--twin", str(signed_twin["twin"]), "--data", str(retina_path)]  # fmt: skip
    # before the fix the study was made and served: the timeout ends that server
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err and "\n" not in err, err
    assert str(retina_path) in err and "2 classes" in err and "train_labels go up to 4" in err
    assert not db.exists()


# 3. `TwinDataset`: trust is explicit


def test_twin_dataset_warns_when_no_key_says_who_signed_the_twin(twin, signed_twin, tmp_path):
    pub = public_key_path(signed_twin["key"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the consortium's key: no warning
        assert len(TwinDataset(twin, public_key=str(pub))) == 2 * PER_CLASS
        assert len(TwinDataset(twin, public_key=pub)) == 2 * PER_CLASS
    stranger = make_signing_key(tmp_path / "stranger.pem")
    sign_twin(twin, stranger)  # re-signed by anyone: the files still match
    with pytest.warns(UntrustedTwinWarning, match="not checked against a trusted key"):
        TwinDataset(twin)
    with pytest.raises(ValueError, match="not by the trusted key"):
        TwinDataset(twin, public_key=pub)
    with pytest.raises(FileNotFoundError, match="missing.pub"):
        TwinDataset(twin, public_key=tmp_path / "missing.pub")
    (tmp_path / "garbage.pub").write_text("not a key\n")
    with pytest.raises(ValueError, match="garbage.pub: no key"):
        TwinDataset(twin, public_key=str(tmp_path / "garbage.pub"))
    with pytest.raises(TypeError, match="public_key"):
        TwinDataset(twin, public_key=stranger)  # a private key is no public key
