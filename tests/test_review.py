"""The reader study: a reader in a real headless browser (Debian's chromium through its
chromedriver) against `fedtwin review serve` on 127.0.0.1; what the hospital releases;
the pooled figures against a central computation; the remote-access and twin checks."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from fedtwin.cli import main as cli
from fedtwin.config import load_config
from fedtwin.histograms import wilson_interval as wilson
from fedtwin.localnet import free_port, wait_for
from fedtwin.review.app import make_app
from fedtwin.review.stats import aggregate, check_aggregate, pool, summarise
from fedtwin.review.store import Study
from fedtwin.signing import load_signing_key, make_signing_key, sign_twin, verify_twin
from fedtwin.twin import write_twin

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CLASSES = ["normal", "pneumonia"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory, small_real) -> dict:
    """A hospital's DICOM archive (from real images) and a signed twin of the same shape."""
    root = tmp_path_factory.mktemp("review")
    images, labels = small_real
    np.savez(root / "real.npz", train_images=images[:160], train_labels=labels[:160, None])
    assert cli(["hospitals", "make", "--source", str(root / "real.npz"), "--hospitals", "2",
                "--out", str(root / "archives")]) == 0  # fmt: skip
    cfg = load_config([])
    rng = np.random.default_rng(0)
    twin_images = np.clip(images[160:200] + rng.normal(0, 20, (40, 28, 28)), 0, 255)
    write_twin(root / "twin", twin_images.astype(np.uint8), labels[160:200],
               class_names=CLASSES, provenance={"config": cfg}, dicom=False)  # fmt: skip
    key = make_signing_key(root / "signing.pem")
    sign_twin(root / "twin", key)
    return {"root": root, "archive": root / "archives" / "hospital-0", "twin": root / "twin",
            "key": root / "signing.pem"}  # fmt: skip


def _browser():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        message = f"{CHROMIUM} and {DRIVER} (Debian's chromium, chromium-driver) are needed"
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs them")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_reader_answers_stops_resumes_and_finishes_in_a_browser(consortium, tmp_path):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    db, port = tmp_path / "study.sqlite", free_port()
    cmd = [sys.executable, "-m", "fedtwin.cli", "review", "serve", "--db", str(db),
           "--twin", str(consortium["twin"]), "--data", str(consortium["archive"]),
           "--images", "10", "--seed", "3", "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    browser = None
    clicked: list[tuple[str, str, bool, int, int]] = []  # reader, token, said real, realism, class
    try:
        wait_for("the review app", lambda: _serving(port), timeout=120, proc=server)
        browser = _browser()
        url = f"http://127.0.0.1:{port}"

        def log_in(name: str) -> None:
            browser.get(url + "/")
            shown("name").send_keys(name)
            browser.find_element(By.ID, "start").click()

        def position() -> int:
            return int(shown("position").text)

        def current_token() -> str | None:
            try:
                found = browser.find_elements(By.NAME, "token")
                return found[0].get_attribute("value") if found else None
            except WebDriverException:  # stale, or "does not belong to the document"
                return None  # a page being replaced while it was read

        def shown(element_id: str):
            """The element, once the page that has it is loaded."""
            return WebDriverWait(browser, 20).until(
                lambda b: (b.find_elements(By.ID, element_id) or [None])[0]
            )

        def next_page(old: str) -> None:
            """Wait until the browser shows the page after ``old``'s answer."""
            WebDriverWait(browser, 20).until(
                lambda b: current_token() not in (None, old) or b.find_elements(By.ID, "finished")
            )

        def answer(reader: str, k: int, keyboard: bool) -> None:
            token = current_token()
            said_real, realism, label = k % 3 != 0, 1 + k % 5, k % 2
            if keyboard:  # the shortcuts: R/S, 1-5, the class letter, Enter
                keys = ("r" if said_real else "s") + str(realism) + "ab"[label]
                browser.find_element(By.TAG_NAME, "body").send_keys(keys + Keys.ENTER)
            else:
                browser.find_element(By.ID, "said-real" if said_real else "said-synthetic").click()
                browser.find_element(By.ID, f"realism-{realism}").click()
                browser.find_element(By.ID, f"label-{label}").click()
                browser.find_element(By.ID, "next").click()
            next_page(token)
            clicked.append((reader, token, said_real, realism, label))

        log_in("alice")
        assert position() == 1 and browser.find_element(By.ID, "total").text == "10"
        browser.find_element(By.ID, "next").click()  # nothing chosen: refused, nothing stored
        assert "Choose real or synthetic" in shown("error").text
        for k in range(4):
            answer("alice", k, keyboard=k % 2 == 1)
            assert position() == k + 2
        browser.find_element(By.ID, "stop").click()
        assert shown("stopped")
        browser.get(url + "/read")  # stopped: logged out
        assert shown("name")

        log_in("bob")  # another reader: his own place in his own order
        assert position() == 1
        answer("bob", 7, keyboard=True)
        browser.find_element(By.ID, "stop").click()

        log_in("alice")  # resumes where she stopped
        assert position() == 5
        for k in range(4, 10):
            answer("alice", k, keyboard=k % 2 == 0)
        assert "Thank you, alice" in shown("finished").text
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)

    # the stored readings are what was clicked, and nothing else
    with sqlite3.connect(db) as con:
        stored = con.execute(
            "SELECT r.reader, i.token, r.said_real, r.realism, r.label, i.source, i.label "
            "FROM readings r JOIN items i ON i.id = r.item"
        ).fetchall()
    truth = {row[1]: (row[5], row[6]) for row in stored}
    assert sorted(row[:5] for row in stored) == sorted(
        (r, t, int(s), m, c) for r, t, s, m, c in clicked
    )
    assert len({t for r, t, *_ in clicked if r == "alice"}) == 10  # every image once

    # the aggregates are the counts of those clicks
    out = tmp_path / "hospital-0-review.json"
    assert cli(["review", "summary", "--db", str(db), "--hospital", "hospital-0",
                "--out", str(out)]) == 0  # fmt: skip
    agg = json.loads(out.read_text())
    assert agg["readers"] == 2 and agg["images"] == {"real": 5, "twin": 5}
    for c, name in enumerate(CLASSES):
        for source in ("real", "twin"):
            mine = [x for x in clicked if truth[x[1]] == (source, c)]
            cell = agg["per_class"][name][source]
            assert cell["readings"] == len(mine)
            assert cell["called_real"] == sum(x[2] for x in mine)
            assert cell["label_agreed"] == sum(x[4] == c for x in mine)
            assert cell["realism"] == [sum(x[3] == k for x in mine) for k in range(1, 6)]


def _read_at_random(study: Study, readers: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for reader in readers:
        study.login(reader)
        for item in study.order(reader)[: rng.integers(3, 12)]:
            study.record(reader, item.token, bool(rng.integers(2)), int(rng.integers(1, 6)),
                         int(rng.integers(2)))  # fmt: skip


def _study(path: Path, consortium: dict, hospital: str, seed: int) -> Study:
    rng = np.random.default_rng(seed)
    with np.load(consortium["root"] / "real.npz") as z:
        real = (z["train_images"][:80], z["train_labels"][:80, 0])
    with np.load(consortium["twin"] / "images.npz") as z:
        twin = (z["train_images"], z["train_labels"][:, 0])
    from fedtwin.signing import sha256_file

    sha = sha256_file(consortium["twin"] / "images.npz")
    study = Study.create(path, real, twin, CLASSES, 12, int(rng.integers(1000)), sha)
    _read_at_random(study, [f"{hospital}-reader-{i}" for i in range(3)], seed)
    return study


def test_only_counts_leave_the_hospital(consortium, tmp_path):
    study = _study(tmp_path / "s.sqlite", consortium, "hospital-0", 1)
    text = json.dumps(aggregate(study, "hospital-0"))
    archive_names = [p.stem for p in consortium["archive"].rglob("*.dcm")]
    assert archive_names  # the archive has files whose names must not leave
    for secret in [*archive_names, str(consortium["archive"]), "hospital-0-reader-0"]:
        assert secret not in text
    with sqlite3.connect(study.path) as con:
        tokens = [t for (t,) in con.execute("SELECT token FROM items")]
    assert not any(t in text for t in tokens)

    def leaves(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from leaves(v)
        elif isinstance(value, list):
            for v in value:
                yield from leaves(v)
        else:
            yield value

    agg = json.loads(text)
    strings = {v for v in leaves(agg) if isinstance(v, str)}
    assert strings == {agg["format"], "hospital-0", agg["twin_images_sha256"], *CLASSES}
    assert all(isinstance(v, int) for v in leaves(agg["per_class"]))  # counts, no pixels
    assert sum(len(list(leaves(agg["per_class"][c]))) for c in CLASSES) == 2 * 2 * 8
    check_aggregate(agg, "test")


def test_pooled_figures_equal_one_central_study(consortium, tmp_path):
    studies = [_study(tmp_path / f"{h}.sqlite", consortium, h, s)
               for h, s in (("hospital-0", 10), ("hospital-1", 11))]  # fmt: skip
    pooled = pool([aggregate(s, f"hospital-{i}") for i, s in enumerate(studies)])
    rows = [r for s in studies for r in s.readings()]  # the central computation
    assert pooled["readers"] == 6 and pooled["all"]["readings"] == len(rows)
    for c, name in [(None, "all"), (0, CLASSES[0]), (1, CLASSES[1])]:
        mine = [r for r in rows if c is None or r["label"] == c]
        got = pooled["all"] if c is None else pooled["per_class"][name]
        correct = sum(r["said_real"] == (r["source"] == "real") for r in mine)
        assert got["real_vs_synthetic_accuracy"] == pytest.approx(correct / len(mine))
        ci = binomtest(correct, len(mine)).proportion_ci(method="wilson")
        assert got["accuracy_ci95"] == pytest.approx([ci.low, ci.high])
        for source in ("real", "twin"):
            part = [r for r in mine if r["source"] == source]
            assert got[f"realism_{source}"] == pytest.approx(np.mean([r["realism"] for r in part]))
            agreed = np.mean([r["read_label"] == r["label"] for r in part])
            assert got[f"label_agreement_{source}"] == pytest.approx(agreed)
    assert pooled["per_hospital"]["hospital-1"] == summarise(
        aggregate(studies[1], "hospital-1")["per_class"]
    )
    assert wilson(0, 0)[0] != wilson(0, 0)[0]  # nan: no readings, no interval
    with pytest.raises(ValueError, match="more than one aggregate"):
        pool([aggregate(studies[0], "h"), aggregate(studies[1], "h")])
    bad = aggregate(studies[0], "hospital-0")
    bad["per_class"][CLASSES[0]]["twin"]["called_real"] = 10**6
    with pytest.raises(ValueError, match="counts are inconsistent"):
        check_aggregate(bad, "hospital-0.json")


def test_access_hosts_and_answers_are_checked(consortium, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from fedtwin.review.commands import access

    study = _study(tmp_path / "s.sqlite", consortium, "hospital-0", 2)
    assert cli(["review", "serve", "--db", str(study.path), "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert access("127.0.0.1", False, None) == (None, ["127.0.0.1", "localhost"])
    (tmp_path / "code").write_text("correct-horse\n")
    assert access("127.0.0.1", False, tmp_path / "code")[0] == "correct-horse"  # asked for
    code, hosts = access("0.0.0.0", True, None)
    assert code and len(code) >= 8 and hosts == ["*"]  # beyond this machine: always a code

    client = TestClient(make_app(study, access_code="correct-horse"), base_url="http://127.0.0.1",
                        headers={"Origin": "http://127.0.0.1"})  # fmt: skip
    assert client.get("/read", follow_redirects=False).status_code == 303  # to the login
    assert client.get("/image/anything").status_code == 403
    refused = client.post("/login", data={"name": "carol", "code": "guess"}, follow_redirects=False)
    assert refused.status_code == 403 and "access code" in refused.text
    ok = client.post("/login", data={"name": "carol", "code": "correct-horse"},
                     follow_redirects=False)  # fmt: skip
    assert ok.status_code == 303 and ok.headers["cache-control"] == "no-store"
    page = client.get("/read")
    assert "carol" in page.text
    token = page.text.split('name="token" value="')[1].split('"')[0]
    assert client.get(f"/image/{token}").content.startswith(b"\x89PNG")

    # a page elsewhere reaching 127.0.0.1 under its own domain (DNS rebinding) is refused
    foreign = TestClient(make_app(study), base_url="http://attacker.example",
                         headers={"Origin": "http://attacker.example"})  # fmt: skip
    assert foreign.post("/login", data={"name": "x"}).status_code == 400

    # bad values are refused with a page, not a server error; only the current image
    answer = {"token": token, "said": "real", "realism": "3"}
    for label in ("\u00b2", "0" * 5000, "7", ""):
        r = client.post("/answer", data={**answer, "label": label})
        assert r.status_code == 400 and "Choose the class" in r.text
    other = next(i.token for i in study.order("carol") if i.token != token)
    r = client.post("/answer", data={**answer, "token": other, "label": "0"})
    assert r.status_code == 400 and "not the image you are reading" in r.text
    assert client.post("/answer", data={**answer, "label": "1"}).status_code == 200
    assert client.post("/answer", data={**answer, "label": "0"}).status_code == 200  # again
    [mine] = [r for r in study.readings() if r["reader"] == "carol"]
    assert mine["read_label"] == 1  # the double submit changed nothing

    # logging out ends the session on the server, not only in the browser
    session = client.cookies.get("fedtwin_review")
    client.get("/logout")
    client.cookies.set("fedtwin_review", session)
    assert client.get("/read", follow_redirects=False).status_code == 303


def test_real_and_twin_images_match_in_every_class_and_in_file_size(consortium, tmp_path):
    from fedtwin.review.store import paired_choice

    study = _study(tmp_path / "s.sqlite", consortium, "hospital-0", 3)
    with sqlite3.connect(study.path) as con:
        rows = con.execute("SELECT source, label, length(png) FROM items").fetchall()
    assert len({n for *_, n in rows}) == 1  # a PNG's size says nothing of its source
    for c in (0, 1):
        assert sum(r[:2] == ("real", c) for r in rows) == sum(r[:2] == ("twin", c) for r in rows)
    real_labels, twin_labels = np.array([0] * 9 + [1] * 2), np.array([0] * 3 + [1] * 9)
    for n, per_class in ((20, [3, 2]), (4, [1, 1]), (7, [2, 1])):  # short classes; odd n
        real, twin = paired_choice(real_labels, twin_labels, 2, n, np.random.default_rng(n))
        assert np.bincount(real_labels[real], minlength=2).tolist() == per_class
        assert np.bincount(twin_labels[twin], minlength=2).tolist() == per_class


def test_pooled_study_goes_into_the_signed_manifest(consortium, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(consortium["twin"], twin)
    summaries = []
    for i in range(2):
        study = _study(tmp_path / f"{i}.sqlite", consortium, f"hospital-{i}", 20 + i)
        summaries.append(tmp_path / f"hospital-{i}.json")
        summaries[-1].write_text(json.dumps(aggregate(study, f"hospital-{i}")))
    out = tmp_path / "reader-study.json"
    args = ["review", "pool", *map(str, summaries), "--out", str(out), "--twin", str(twin)]
    assert cli(args) == 2 and "--signing-key" in capsys.readouterr().err  # signed: needs the key
    assert cli([*args, "--signing-key", str(consortium["key"])]) == 0
    manifest = json.loads((twin / "manifest.json").read_text())
    assert manifest["reader_study"]["all"] == json.loads(out.read_text())["all"]
    trusted = load_signing_key(consortium["key"]).public_key()
    assert verify_twin(twin, trusted).ok  # signed again over the new manifest, by that key
    pooled = json.loads(out.read_text())
    page = out.with_suffix(".html").read_text()  # the report's section: pooled, per hospital
    assert "<h2>hospital-1</h2>" in page
    assert f"{pooled['all']['real_vs_synthetic_accuracy']:.2f}" in page

    other = tmp_path / "other"
    shutil.copytree(consortium["twin"], other)
    with np.load(other / "images.npz") as z:
        arrays = dict(z)
    arrays["train_images"] = 255 - arrays["train_images"]
    np.savez_compressed(other / "images.npz", **arrays)
    assert cli(["review", "pool", *map(str, summaries), "--out", str(out), "--twin", str(other),
                "--signing-key", str(consortium["key"])]) == 2  # fmt: skip
    assert "images.npz" in capsys.readouterr().err  # not the twin they read, or tampered

    (tmp_path / "damaged.json").write_text('{"format": "fedtwin reader study aggregate"')
    assert cli(["review", "pool", str(tmp_path / "damaged.json"), "--out", str(out)]) == 2
    assert "damaged.json: not JSON" in capsys.readouterr().err
    agg = json.loads(summaries[0].read_text())
    del agg["readers"]
    with pytest.raises(ValueError, match="'readers' must be a count"):
        check_aggregate(agg, "hospital-0.json")
