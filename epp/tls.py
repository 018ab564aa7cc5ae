"""gRPC server credentials: a self-signed leaf certificate generated at start (as the
reference picker does; gateways skip verification), or tls.crt/tls.key from --cert-path."""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

import grpc


def serving_names(hostname: str | None = None) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) the generated certificate is valid for: localhost,
    the loopback addresses and the pod's hostname (Kubernetes sets it to the pod name)."""
    host = socket.gethostname() if hostname is None else hostname
    dns = ["localhost"] + ([host] if host and host != "localhost" else [])
    return dns, ["127.0.0.1", "::1"]


def self_signed(common_name: str = "epp", days: int = 3650, hostname: str | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for a fresh EC P-256 key: a self-signed leaf
    (not a CA) for serving only, so it can be given to a client as --ca-file without
    letting it vouch for any other certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Inference Ext")])
    now = datetime.datetime.now(datetime.UTC)
    dns, ips = serving_names(hostname)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    usage = x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
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
