"""The consortium PKI: certificates chain to the CA, keys are private and never
overwritten, and the certificates work in a real mutual-TLS handshake on 127.0.0.1."""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedtwin import pki
from fedtwin.cli import main


@pytest.fixture
def ca_dir(tmp_path):
    pki.init_ca(tmp_path / "pki")
    return tmp_path / "pki"


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_chains_to_ca_with_sans(ca_dir):
    cert = load(pki.issue_server(ca_dir, "superlink", ["127.0.0.1", "localhost"]))
    cert.verify_directly_issued_by(load(ca_dir / "ca.pem"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    for key in ("ca.key", "superlink.key"):
        assert stat.S_IMODE((ca_dir / key).stat().st_mode) == 0o600


def test_nothing_is_overwritten(ca_dir):
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="never overwrites"):
        pki.init_ca(ca_dir)
    pki.issue_client(ca_dir, "alice", "researcher")
    with pytest.raises(FileExistsError):
        pki.issue_client(ca_dir, "alice", "operator")
    assert (ca_dir / "ca.key").read_bytes() == before
    assert pki.role_of(load(ca_dir / "alice.pem")) == "researcher"


def test_roles_and_errors(ca_dir, tmp_path):
    assert pki.role_of(load(pki.issue_client(ca_dir, "op", "operator"))) == "operator"
    with pytest.raises(ValueError, match="role"):
        pki.issue_client(ca_dir, "mallory", "admin")
    with pytest.raises(FileNotFoundError, match="pki init"):
        pki.issue_server(tmp_path / "empty", "superlink", ["127.0.0.1"])


def test_node_keys_are_what_flower_loads(ca_dir):
    key_path, pub_path = pki.make_node_keys(ca_dir, "hospital-0")
    key = load_ssh_private_key(key_path.read_bytes(), None)  # as flower-supernode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    public = load_ssh_public_key(pub_path.read_bytes())  # as `flwr supernode register` does
    assert public.public_numbers() == key.public_key().public_numbers()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_cli_makes_a_pki(tmp_path, capsys):
    d = str(tmp_path / "p")
    assert main(["pki", "init", "--dir", d]) == 0
    assert main(["pki", "server", "--dir", d, "--name", "catalog", "--host", "127.0.0.1"]) == 0
    assert main(["pki", "cert", "--dir", d, "--name", "bob", "--role", "hospital"]) == 0
    assert main(["pki", "node", "--dir", d, "--name", "hospital-1"]) == 0
    assert main(["pki", "init", "--dir", d]) == 2  # exists: clear error, exit 2
    assert "never overwrites" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../x", "a/b", "absolute", ".hidden", ""])
def test_names_never_write_outside_the_pki_directory(tmp_path, capsys, name):
    name = str(tmp_path / "x") if name == "absolute" else name
    d = tmp_path / "pki" / "inner"
    assert main(["pki", "init", "--dir", str(d)]) == 0
    before = sorted(tmp_path.rglob("*"))
    for action in (["cert", "--role", "researcher"], ["server", "--host", "127.0.0.1"], ["node"]):
        assert main(["pki", action[0], "--dir", str(d), "--name", name, *action[1:]]) == 2
        assert "--name" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


def handshake(ca_dir, client_cert, client_key, client_ca) -> str:
    """Mutual TLS on 127.0.0.1: returns the role the server read from the client's cert."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_dir / "ca.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(ca_dir / "srv.pem", ca_dir / "srv.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict = {}

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["role"] = pki.role_of(x509.load_der_x509_certificate(tls.getpeercert(True)))
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            seen["error"] = e

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=client_ca)
    client_ctx.load_cert_chain(client_cert, client_key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.recv(2)
    finally:
        thread.join(timeout=10)
        listener.close()
    if "error" in seen:
        raise seen["error"]
    return seen["role"]


def test_mutual_tls_handshake(ca_dir, tmp_path):
    pki.issue_server(ca_dir, "srv", ["127.0.0.1"])
    pki.issue_client(ca_dir, "carol", "researcher")
    ca = ca_dir / "ca.pem"
    assert handshake(ca_dir, ca_dir / "carol.pem", ca_dir / "carol.key", ca) == "researcher"
    # a certificate from another CA is refused by the server
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue_client(other, "eve", "researcher")
    with pytest.raises((ssl.SSLError, OSError)):
        handshake(ca_dir, other / "eve.pem", other / "eve.key", ca)
