"""The consortium's keys and certificates, made with ``cryptography``.

One directory (``pki/`` say) holds what the operator issues:

    ca.pem, ca.key                  the consortium CA (ECDSA P-256, self-signed)
    <server>.pem, <server>.key      a TLS server certificate (SuperLink, catalog) with SANs
    <name>.pem, <name>.key          a client certificate carrying a role: operator, hospital
                                    or researcher (the catalog authorises by it)
    <hospital>.node, .node.pub      a hospital's SuperNode authentication key pair
                                    (EC P-256, OpenSSH format, as Flower expects)

Private keys are written with mode 0600 and never overwritten. The twin-signing key is in
``fedtwin.signing``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtwin.signing import write_private

ROLES = ("operator", "hospital", "researcher")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """A name that becomes a file stem in the PKI directory: never a path elsewhere."""
    if not _NAME.match(name):
        raise ValueError(
            f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (it names files in the PKI directory)"
        )
    return name


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists; fedtwin never overwrites PKI files")


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_public(path: Path, data: bytes) -> None:
    _refuse_existing(path)
    path.write_bytes(data)


def _name(common_name: str, role: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtwin consortium"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
    if role:
        attrs.insert(1, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int):
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def init_ca(directory: Path, name: str = "fedtwin consortium CA", days: int = 3650) -> Path:
    """Make the consortium CA in ``directory``; returns the certificate's path."""
    directory = Path(directory)
    _refuse_existing(directory / CA_KEY, directory / CA_CERT)
    key = _new_key()
    subject = _name(name)
    cert = (
        _builder(subject, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    write_private(directory / CA_KEY, _pem_key(key))
    _write_public(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return directory / CA_CERT


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    directory = Path(directory)
    if not (directory / CA_CERT).is_file() or not (directory / CA_KEY).is_file():
        raise FileNotFoundError(
            f"no consortium CA in {directory}: run `fedtwin pki init --dir {directory}` first"
        )
    cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / CA_KEY}: not an EC private key")
    return cert, key


def _leaf(
    directory: Path,
    name: str,
    *,
    usage: x509.ObjectIdentifier,
    role: str | None = None,
    sans: list[x509.GeneralName] | None = None,
    days: int,
) -> Path:
    directory = Path(directory)
    check_name(name)
    ca_cert, ca_key = load_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _refuse_existing(cert_path, key_path)
    key = _new_key()
    builder = (
        _builder(_name(name, role), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue_server(directory: Path, name: str, hosts: list[str], days: int = 825) -> Path:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("a server certificate needs at least one --host (name or IP)")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _leaf(directory, name, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans, days=days)


def issue_client(directory: Path, name: str, role: str, days: int = 365) -> Path:
    """A client certificate for mutual TLS whose subject OU is ``role``."""
    if role not in ROLES:
        raise ValueError(f"role: expected one of {', '.join(ROLES)}, got {role!r}")
    return _leaf(directory, name, usage=ExtendedKeyUsageOID.CLIENT_AUTH, role=role, days=days)


def role_of(cert: x509.Certificate) -> str | None:
    """The role a client certificate carries (its subject OU), if it is a known one."""
    values = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(values[0].value) if values else None
    return role if role in ROLES else None


def make_node_keys(directory: Path, hospital: str) -> tuple[Path, Path]:
    """A hospital's SuperNode authentication key pair (EC P-256, OpenSSH format): the
    private key stays at the hospital, the public key is registered at the SuperLink."""
    directory = Path(directory)
    check_name(hospital)
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_path, pub_path = directory / f"{hospital}.node", directory / f"{hospital}.node.pub"
    _refuse_existing(key_path, pub_path)
    write_private(key_path, private)
    _write_public(pub_path, public + f" {hospital}\n".encode())
    return key_path, pub_path
