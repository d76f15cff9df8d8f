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
        """The mapping :mod:`fedlora.run.launch` takes (``ca``, ``cert``, ``key``)."""
        return {"ca": str(self.ca), "cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True)
class NodeKey:
    """Paths of one SuperNode's private key and of the public key to register."""

    private: Path
    public: Path


class CertificateExistsError(FileExistsError):
    """Key material is already there: replacing a CA invalidates every certificate it signed."""


def _write(path: Path, data: bytes, secret: bool, overwrite: bool = False) -> None:
    """Write ``data``; a secret is created 0600 and never readable by others, even briefly.

    Without ``overwrite`` an existing file is an error, not replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600 if secret else 0o644)
    except FileExistsError:
        raise CertificateExistsError(
            f"{path} exists; not replacing it (use --force to overwrite)"
        ) from None
    with os.fdopen(fd, "wb") as fh:
        if secret:  # an existing file keeps its mode through O_TRUNC: tighten it first
            os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


def existing_files(folder: Path, nodes: Sequence[str], server: bool) -> list[Path]:
    """The files :func:`make_server_files` and :func:`make_node_key` would replace."""
    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] if server else []
    names += [f"{n}{ext}" for n in nodes for ext in (".key", ".pub")]
    return [folder / n for n in names if (folder / n).exists()]


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


def make_server_files(
    folder: Path,
    hosts: Sequence[str],
    days: int = 365,
    *,
    keep_ca_key: bool = True,
    overwrite: bool = False,
) -> ServerFiles:
    """A CA and a SuperLink certificate valid for ``hosts`` (names or IP addresses).

    ``hosts`` must hold every name or address SuperNodes and ``flwr`` use to reach the
    SuperLink: TLS checks the address dialled against the subject alternative names.
    ``keep_ca_key=False`` never writes the CA's private key (a throw-away CA, as
    ``deploy-local`` uses: nothing can sign more certificates after it). Existing files
    are refused unless ``overwrite``: a new CA invalidates every certificate of the old.
    """
    if not overwrite and existing_files(folder, [], server=True):
        found = ", ".join(str(p) for p in existing_files(folder, [], server=True))
        raise CertificateExistsError(f"{found} exist; not replacing them (use --force)")
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
    # secrets first, each created 0600: a public file never sits beside a half-written key
    if keep_ca_key:
        _write(folder / CA_KEY, ca_key.private_bytes(pem, private, plain), True, overwrite)
    _write(files.key, key.private_bytes(pem, private, plain), True, overwrite)
    _write(files.ca, ca_cert.public_bytes(pem), False, overwrite)
    _write(files.cert, cert.public_bytes(pem), False, overwrite)
    return files


def make_node_key(folder: Path, name: str, *, overwrite: bool = False) -> NodeKey:
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
        overwrite=overwrite,
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(files.public, public + b"\n", secret=False, overwrite=overwrite)
    return files
