"""`make certs`: a local certificate authority and one certificate per mesh process, for
development and tests (never for production: the CA key sits next to the certificates).

Writes under ``--out`` (default ./certs/, gitignored)::

    ca.pem, ca-key.pem                 the CA (EC P-256), valid --ca-days
    <name>.pem, <name>-key.pem         for clustering, attribution, privacy, feedback, gateway

Each leaf certificate is valid for serverAuth *and* clientAuth (a service is a server to
its callers and a client of its peers: mutual TLS), with the names ``localhost``,
``<name>``, ``hearth-<name>`` (the Kubernetes Service) and the loopback addresses. Keys
are written with mode 0600. An existing CA is reused unless ``--force``, so re-running
adds missing certificates without invalidating the others.

Use: HEARTH_TLS_CERT=certs/<name>.pem HEARTH_TLS_KEY=certs/<name>-key.pem HEARTH_TLS_CA=certs/ca.pem
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

DEFAULT_NAMES = ("clustering", "attribution", "privacy", "feedback", "gateway")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hearth development CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(name: str, ca_key, ca_cert: x509.Certificate, days: int,
              extra_names: tuple[str, ...] = ()) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    dns = ["localhost", name, f"hearth-{name}", *extra_names]
    sans = [x509.DNSName(d) for d in dict.fromkeys(dns)] + [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def generate(out: Path, names: tuple[str, ...] = DEFAULT_NAMES, force: bool = False,
             ca_days: int = 3650, days: int = 825) -> dict[str, Path]:
    """Create (or reuse) the CA and a certificate per name; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key_pem = out / "ca.pem", out / "ca-key.pem"
    if ca_pem.exists() and ca_key_pem.exists() and not force:
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)
    else:
        ca_key, ca_cert = make_ca(ca_days)
        _write_key(ca_key_pem, ca_key)
        _write_cert(ca_pem, ca_cert)
        force = True  # a new CA invalidates every old leaf
    written = {"ca": ca_pem}
    for name in names:
        cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
        if cert_path.exists() and key_path.exists() and not force:
            written[name] = cert_path
            continue
        key, cert = make_leaf(name, ca_key, ca_cert, days)
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        written[name] = cert_path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("certs"))
    parser.add_argument("--names", nargs="+", default=list(DEFAULT_NAMES))
    parser.add_argument("--force", action="store_true", help="new CA and certificates")
    parser.add_argument("--days", type=int, default=825, help="validity of each leaf certificate")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be >= 1")
    written = generate(args.out, tuple(args.names), args.force, days=args.days)
    for name, path in written.items():
        print(f"{name:<12} {path}")
    print(f"\nuse: HEARTH_TLS_CERT={args.out}/<name>.pem HEARTH_TLS_KEY={args.out}/<name>-key.pem "
          f"HEARTH_TLS_CA={args.out}/ca.pem", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
