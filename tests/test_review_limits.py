"""The reader study's limits, against `fedtwin review serve` on a free port of 127.0.0.1
(and of ::1): request bodies are bounded before anything reads them, the port is one a
reader can be told, and an IPv6 loopback host is answered under its bracketed name; a form
post from another site is refused, wrong access codes are limited per client, readers and
their sessions are bounded, reader names are normalised, and TLS files that cannot serve
are named before a study is made."""

from __future__ import annotations

import http.client
import socket
import sqlite3
import subprocess
import sys
import unicodedata
import urllib.parse
from pathlib import Path

import pytest

from fedtwin.cli import main as cli
from fedtwin.localnet import free_port, wait_for
from fedtwin.review.guards import MAX_BODY, MAX_CODE_TRIES, host_name
from fedtwin.review.names import MAX_NAME
from fedtwin.review.store import MAX_READERS, MAX_SESSIONS

WAIT_S = 60  # the server's start: Python, FastAPI and uvicorn imported on a busy machine
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def study(tmp_path_factory, make_study) -> Path:
    return make_study(tmp_path_factory.mktemp("limits") / "study.sqlite")


def _serve(study: Path, host: str, port: int, *options: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedtwin.cli", "review", "serve", "--db", str(study),
           "--host", host, "--port", str(port), *options]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stop(server: subprocess.Popen) -> str:
    """End the server by its PID; what it printed."""
    server.terminate()
    try:
        out, _ = server.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        out, _ = server.communicate()
    return out


def _status(host: str, port: int, headers: dict | None = None) -> int | None:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/", headers=headers or {})
        return conn.getresponse().status
    except OSError:
        return None


def _running(study: Path, *options: str):
    """``fedtwin review serve`` of ``study`` on a free port of 127.0.0.1, while in use."""
    port = free_port()
    proc = _serve(study, "127.0.0.1", port, *options)
    try:
        wait_for("review serve", lambda: _status("127.0.0.1", port) == 200, WAIT_S, proc)
        yield port
    finally:
        out = _stop(proc)
    assert "Traceback" not in out and "Exception" not in out, out  # refusals are quiet


@pytest.fixture(scope="module")
def server(study):
    yield from _running(study)


def _post(port: int, headers: dict, chunks: list[bytes] = (), end: bool = True):
    """POST /login with ``headers``; ``chunks`` sent chunked (``end``: and the last chunk).
    The status and body of the answer, read within 10 s."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", "/login")
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    try:
        for chunk in chunks:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        if chunks and end:
            conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the body ended: read its answer
    response = conn.getresponse()
    return response.status, response.read().decode()


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server):
    """1 GiB announced, nothing sent: the answer comes at once (no wait for the body)."""
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    status, text = _post(server, {**multipart, "Content-Length": str(2**30)})
    assert status == 413 and f"over {MAX_BODY} bytes" in text
    assert _post(server, {**multipart, "Content-Length": "nine"})[0] in (400, 413)


def test_a_chunked_body_is_refused_once_it_passes_the_limit(server):
    """No Content-Length: the chunks are counted, and the rest is never waited for."""
    part = b'--x\r\nContent-Disposition: form-data; name="name"; filename="a"\r\n\r\n'
    chunks = [part] + [b"a" * 4096] * (4 * MAX_BODY // 4096)
    headers = {"Content-Type": "multipart/form-data; boundary=x", "Transfer-Encoding": "chunked",
               "Origin": f"http://127.0.0.1:{server}"}  # a post the app reads  # fmt: skip
    assert _post(server, headers, chunks, end=False)[0] == 413
    assert _post(server, headers, chunks, end=True)[0] == 413


def test_a_login_under_the_limit_is_answered_as_before(server):
    body, headers = b"name=carol", {**FORM, "Origin": f"http://127.0.0.1:{server}"}
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("POST", "/login", body=body, headers=headers)
    assert conn.getresponse().status == 303  # logged in, on to /read


@pytest.mark.parametrize("port", ["70000", "65536", "0", "-1", "http"])
def test_a_port_a_reader_cannot_be_told_is_refused_before_anything(port, tmp_path, capsys):
    db = tmp_path / "study.sqlite"
    with pytest.raises(SystemExit) as e:
        cli(["review", "serve", "--db", str(db), "--port", port])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"argument --port: '{port}': must be a whole number from 1 to 65535" in err
    assert not db.exists()


@pytest.mark.parametrize("option, value", [("--seed", "-1"), ("--images", "0")])
def test_serve_refuses_a_seed_or_image_count_out_of_range(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["review", "serve", "--db", str(tmp_path / "s.sqlite"), option, value])
    assert f"argument {option}: '{value}': must be a whole number" in capsys.readouterr().err


def test_host_names_are_compared_as_the_browser_sends_them():
    assert host_name("[::1]:8765") == host_name("[0:0::1]") == "::1"
    assert host_name("LocalHost:8765") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("::1") != "::1"  # unbracketed: not a host header a browser sends


def _ipv6_loopback() -> int | None:
    """A free port on ::1, or None where this machine has no IPv6 loopback."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def test_serving_on_the_ipv6_loopback_answers_its_bracketed_host(study):
    port = _ipv6_loopback()
    if port is None:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    proc = _serve(study, "::1", port)
    try:
        wait_for("review serve on ::1", lambda: _status("::1", port), WAIT_S, proc)
        assert _status("::1", port) == 200  # http.client sends Host: [::1]:port
        assert _status("::1", port, {"Host": f"localhost:{port}"}) == 200
        assert _status("::1", port, {"Host": "attacker.example"}) == 400
    finally:
        out = _stop(proc)
    assert f"readers open http://[::1]:{port}/" in out


def _form(port: int, path: str, fields: dict, headers: dict, cookie: str = ""):
    """POST ``fields`` as a form to ``path``: the status, the headers and the text."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    cookies = {"Cookie": cookie} if cookie else {}
    body = urllib.parse.urlencode(fields)
    conn.request("POST", path, body=body, headers={**FORM, **headers, **cookies})
    response = conn.getresponse()
    return response.status, response.headers, response.read().decode()


def _same_site(port: int) -> dict:
    return {"Origin": f"http://127.0.0.1:{port}"}  # what a browser sends from the login page


def _readers(study: Path) -> list[str]:
    with sqlite3.connect(study) as db:
        return [row[0] for row in db.execute("SELECT name FROM readers ORDER BY name")]


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://attacker.example"},
        {"Origin": "http://127.0.0.1:1"},  # another port is another site
        {"Origin": "null", "Referer": "http://attacker.example/page"},
        {"Referer": "http://attacker.example/page"},
        {},  # neither: not a browser's form post
    ],
)
def test_a_form_post_from_another_site_is_refused(server, study, headers):
    """Login CSRF: another site's page posting its own name to the study's login."""
    before = _readers(study)
    status, _, text = _form(server, "/login", {"name": "mallory"}, headers)
    assert status == 403 and "another site" in text
    assert _form(server, "/answer", {"token": "x", "said": "real"}, headers)[0] == 403
    assert _readers(study) == before


def test_a_form_post_from_the_study_page_is_answered(server, study):
    referer_only = {"Origin": "null", "Referer": f"http://127.0.0.1:{server}/"}
    for headers in (_same_site(server), referer_only):
        assert _form(server, "/login", {"name": "dora"}, headers)[0] == 303
    assert "dora" in _readers(study)


@pytest.fixture
def coded_server(tmp_path, make_study):
    """A server of its own study, asking for an access code."""
    (tmp_path / "code").write_text("correct-horse-battery\n")
    study = make_study(tmp_path / "study.sqlite")
    for port in _running(study, "--access-code-file", str(tmp_path / "code")):
        yield port, study


def test_wrong_access_codes_are_limited_per_client(coded_server):
    port, study = coded_server
    login = {"name": "mallory", "code": "guess"}
    for _ in range(MAX_CODE_TRIES):
        assert _form(port, "/login", login, _same_site(port))[0] == 403
    status, headers, text = _form(port, "/login", login, _same_site(port))
    assert status == 429 and "Too many wrong codes" in text
    assert 0 < int(headers["Retry-After"]) <= 60
    right = {**login, "code": "correct-horse-battery"}  # no more tries, even the right one
    assert _form(port, "/login", right, _same_site(port))[0] == 429
    assert _readers(study) == []


@pytest.mark.parametrize(
    "name",
    ["bob\x00", "\u202eevil", "al\u2067ice", "\x1b[31mred", "\u200b", " \u00a0\t ", "bo\u200bb",
     "a" * (MAX_NAME + 1), "\ue000"],
)  # fmt: skip
def test_a_reader_name_that_hides_or_passes_for_another_is_refused(server, study, name):
    """NUL and control characters, direction overrides, invisible, empty or long names."""
    before = _readers(study)
    status, _, text = _form(server, "/login", {"name": name}, _same_site(server))
    assert status == 400 and "name" in text
    assert _readers(study) == before


def test_reader_names_are_kept_in_one_form(server, study):
    for name in ("Ame\u0301lie", "  Am\u00e9lie ", "Ann   Lee", "Ann\u00a0Lee"):
        assert _form(server, "/login", {"name": name}, _same_site(server))[0] == 303
    readers = _readers(study)
    assert readers.count(unicodedata.normalize("NFC", "Amélie")) == 1
    assert readers.count("Ann Lee") == 1 and "Ann   Lee" not in readers


def test_a_study_takes_a_bounded_number_of_readers_and_sessions(tmp_path, make_study):
    study = make_study(tmp_path / "study.sqlite")
    for port in _running(study):
        for i in range(MAX_READERS):
            assert _form(port, "/login", {"name": f"r{i}"}, _same_site(port))[0] == 303
        status, _, text = _form(port, "/login", {"name": "one too many"}, _same_site(port))
        assert status == 403 and f"{MAX_READERS} readers" in text
        cookies = []
        for _ in range(MAX_SESSIONS + 1):  # a reader already in may log in again
            status, headers, _ = _form(port, "/login", {"name": "r0"}, _same_site(port))
            assert status == 303
            cookies.append(headers["set-cookie"].split(";")[0])
        assert _get_read(port, cookies[-1]) == 200
        assert _get_read(port, cookies[0]) == 303  # the oldest login ended
    assert len(_readers(study)) == MAX_READERS
    with sqlite3.connect(study) as db:
        [(sessions,)] = db.execute("SELECT COUNT(*) FROM sessions WHERE reader = 'r0'")
    assert sessions == MAX_SESSIONS


def _get_read(port: int, cookie: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/read", headers={"Cookie": cookie})
    return conn.getresponse().status


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict:
    """Two server certificates with their keys, and one key encrypted."""
    from cryptography.hazmat.primitives import serialization

    from fedtwin.pki import init_ca, issue_server

    root = tmp_path_factory.mktemp("tls")
    init_ca(root)
    a, b = (issue_server(root, name, ["127.0.0.1"]) for name in ("a", "b"))
    key = serialization.load_pem_private_key((root / "a.key").read_bytes(), None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (root / "locked.key").write_bytes(locked)
    (root / "junk.pem").write_text("not a certificate\n")
    return {"a": a, "a_key": root / "a.key", "b_key": root / "b.key", "locked": root / "locked.key",
            "junk": root / "junk.pem", "missing": root / "missing.pem"}  # fmt: skip


@pytest.mark.parametrize(
    "cert, key, named, says",
    [
        ("missing", "a_key", "--tls-cert", "no such file"),
        ("a", "missing", "--tls-key", "no such file"),
        ("junk", "a_key", "--tls-cert", "not a PEM certificate"),
        ("a", "junk", "--tls-key", "not a PEM private key"),
        ("a", "locked", "--tls-key", "encrypted"),
        ("a", "b_key", "--tls-key", "is not the key of --tls-cert"),
    ],
)
def test_tls_files_that_cannot_serve_are_named_before_a_study_is_made(
    tls, tmp_path, capsys, cert, key, named, says
):
    db = tmp_path / "study.sqlite"
    argv = ["review", "serve", "--db", str(db), "--twin", str(tmp_path / "no-twin"),
            "--data", str(tmp_path / "no-data"), "--port", str(free_port()),
            "--tls-cert", str(tls[cert]), "--tls-key", str(tls[key])]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"{named} {tls[key] if named == '--tls-key' else tls[cert]}" in err and says in err
    assert "Traceback" not in err and not db.exists()
