"""gRPC server credentials: a self-signed certificate generated at start (as the
reference picker does; gateways skip verification), or tls.crt/tls.key from --cert-path."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import grpc


def self_signed(common_name: str = "epp", days: int = 3650) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for a fresh EC P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Inference Ext")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname() or "localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_credentials(cert_path: str = "") -> grpc.ServerCredentials:
    """TLS credentials from `cert_path`/tls.crt + tls.key, else a self-signed pair."""
    cert_pem, key_pem = cert_material(cert_path)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def cert_material(cert_path: str = "") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) from `cert_path`/tls.crt + tls.key, else a self-signed pair."""
    if cert_path:
        d = Path(cert_path)
        crt, key = d / "tls.crt", d / "tls.key"
        missing = [str(p) for p in (crt, key) if not p.is_file()]
        if missing:
            raise ValueError(f"--cert-path: missing {', '.join(missing)}")
        cert_pem, key_pem = crt.read_bytes(), key.read_bytes()
    else:
        cert_pem, key_pem = self_signed()
    return cert_pem, key_pem
