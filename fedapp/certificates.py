"""A test CA and a server certificate for a TLS deployment (SuperLink): used by
``scripts/make_certificates.py`` and ``fedapp provision``. The CA's private key is
not kept. For tests and trials: a production deployment uses certificates from the
organisation's own CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ["127.0.0.1", "localhost"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _new_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedapp test CA"))
          .issuer_name(_name("fedapp test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    return ca, ca_key


def _issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, name: str,
           hosts: list[str], usages: list, days: int
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))


def _refuse_existing(out: Path, names: list[str]) -> None:
    existing = [str(out / n) for n in names if (out / n).exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} exist: remove them or choose another "
                              "directory")


def make_certificates(out: Path, hosts: list[str], days: int = 30) -> None:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` (0600) into ``out``.

    Raises
    ------
    FileExistsError
        If any of the three exists already.
    """
    out.mkdir(parents=True, exist_ok=True)
    _refuse_existing(out, ["ca.crt", "server.pem", "server.key"])
    ca, ca_key = _new_ca(days)
    cert, key = _issue(ca, ca_key, hosts[0], hosts, [ExtendedKeyUsageOID.SERVER_AUTH], days)
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server.key", key)


def make_party_certificates(out: Path, parties: dict[str, list[str]], days: int = 30) -> None:
    """A CA and one certificate per party for mutual TLS: ``ca.crt``, ``<role>.pem`` and
    ``<role>.key`` (0600). Each certificate names its role (common name and a DNS name)
    and the hosts it listens on; each party gets ``ca.crt`` and only its own pair.

    Raises
    ------
    FileExistsError
        If any file exists already.
    """
    out.mkdir(parents=True, exist_ok=True)
    _refuse_existing(out, ["ca.crt", *[f"{r}{ext}" for r in parties for ext in (".pem", ".key")]])
    ca, ca_key = _new_ca(days)
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for role, hosts in parties.items():
        cert, key = _issue(ca, ca_key, role, [role, *hosts], usages, days)
        (out / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(out / f"{role}.key", key)
