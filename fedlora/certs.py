"""Key material for a secure deployment: a CA, the SuperLink's certificate, node keys.

What Flower 1.39 expects: the SuperLink serves TLS with a certificate signed by a CA
that every SuperNode and ``flwr`` user trusts (``--root-certificates``), valid for the
names and addresses nodes dial (subject alternative names); each SuperNode signs its
requests with an ECDSA key on a NIST curve, private part in OpenSSH format
(``--auth-supernode-private-key``), public part in OpenSSH format for
``flwr supernode register``. Written with the ``cryptography`` package (a Flower
dependency), so no ``openssl`` or ``ssh-keygen`` is needed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


@dataclass(frozen=True)
class ServerFiles:
    """Paths of the CA certificate and the SuperLink's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def as_tls(self) -> dict[str, str]:
        """The mapping :mod:`fedlora.launch` takes (``ca``, ``cert``, ``key``)."""
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True)
class NodeKey:
    """Paths of one SuperNode's private key and of the public key to register."""

    private: Path
    public: Path


def _write(path: Path, data: bytes, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_files(folder: Path, hosts: Sequence[str], days: int = 365) -> ServerFiles:
    """A CA and a SuperLink certificate valid for ``hosts`` (names or IP addresses).

    ``hosts`` must hold every name or address SuperNodes and ``flwr`` use to reach the
    SuperLink: TLS checks the address dialled against the subject alternative names.
    """
    if not hosts:
        raise ValueError("hosts is empty: name at least one address the SuperLink is reached at")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedlora CA"))
        .issuer_name(_name("fedlora CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    plain = serialization.NoEncryption()
    files = ServerFiles(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)
    _write(files.ca, ca_cert.public_bytes(pem), secret=False)
    _write(folder / CA_KEY, ca_key.private_bytes(pem, private, plain), secret=True)
    _write(files.cert, cert.public_bytes(pem), secret=False)
    _write(files.key, key.private_bytes(pem, private, plain), secret=True)
    return files


def make_node_key(folder: Path, name: str) -> NodeKey:
    """An ECDSA P-384 key pair for one SuperNode, both halves in OpenSSH format."""
    key = ec.generate_private_key(ec.SECP384R1())
    files = NodeKey(folder / f"{name}.key", folder / f"{name}.pub")
    _write(
        files.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        secret=True,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(files.public, public + b"\n", secret=False)
    return files
