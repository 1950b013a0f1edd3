"""``splitinfer certs``: a private CA plus server and client certificates for TLS / mutual TLS on the gRPC link.

For test and small deployments: a user with their own PKI passes its files to the same flags. Keys are EC P-256;
the server certificate carries every host name and IP address edges will dial as subjectAltNames (gRPC checks
them). Files are written atomically with private keys readable by the owner only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitinfer"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(cn: str, key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey,
           days: int, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def make_certs(out: str | os.PathLike, hosts: list[str], clients: list[str], days: int = 365) -> dict[str, Path]:
    """Write ca.pem (+ ca.key), server.pem/server.key for ``hosts`` and <client>.pem/<client>.key per client."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("splitinfer test CA")
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": out / "ca.pem", "ca_key": out / "ca.key"}
    _write(files["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(files["ca_key"], _key_pem(ca_key), private=True)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    for cn, usage, names in [("server", ExtendedKeyUsageOID.SERVER_AUTH, sans),
                             *((c, ExtendedKeyUsageOID.CLIENT_AUTH, []) for c in clients)]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(hosts[0] if cn == "server" and hosts else cn, key, ca_name, ca_key, days, usage, names)
        files[cn] = out / f"{cn}.pem"
        files[f"{cn}_key"] = out / f"{cn}.key"
        _write(files[cn], cert.public_bytes(serialization.Encoding.PEM))
        _write(files[f"{cn}_key"], _key_pem(key), private=True)
    return files
