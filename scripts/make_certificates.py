"""Make a test CA and a server certificate for a TLS deployment (SuperLink).

    python scripts/make_certificates.py OUT_DIR [--host 127.0.0.1 --host server.example]

Writes OUT_DIR/ca.crt (give it to every client node), OUT_DIR/server.pem and
OUT_DIR/server.key (mode 0600, for the server only; refused by ``fedapp server``
when others can read it). OUT_DIR inside a Flower app is refused (the app's files
travel to the server in its bundle; ``fedapp run`` refuses an app holding a key). Existing files are never overwritten. The CA's private
key is not kept. For tests and trials: a production deployment uses certificates
from the organisation's own CA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedapp.bundle import refuse_inside_app  # noqa: E402


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(out: Path, hosts: list[str], days: int = 30) -> None:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` (0600) into ``out``.

    Raises
    ------
    FileExistsError
        If any of the three exists already.
    """
    out.mkdir(parents=True, exist_ok=True)
    existing = [str(out / n) for n in ("ca.crt", "server.pem", "server.key") if (out / n).exists()]
    if existing:
        raise FileExistsError(f"{', '.join(existing)} exist: remove them or choose another "
                              "directory")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedapp test CA"))
          .issuer_name(_name("fedapp test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = out / "server.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--host", action="append", help="name or IP the server is reached by "
                   "(repeatable; default 127.0.0.1 and localhost)")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--allow-inside-app", action="store_true", help="write into a Flower "
                   "app's directory all the same (fedapp sim/run refuse to submit an app "
                   "holding server.key)")
    args = p.parse_args()
    try:
        if not args.allow_inside_app:
            refuse_inside_app(args.out, "the server's TLS key")
        make_certificates(args.out, args.host or ["127.0.0.1", "localhost"], args.days)
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f"make_certificates: {err}") from None
    print(f"wrote {args.out}/ca.crt, server.pem, server.key")


if __name__ == "__main__":
    main()
