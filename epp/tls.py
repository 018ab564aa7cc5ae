"""Serving TLS: a self-signed leaf certificate generated at start (as the reference picker
does; gateways skip verification), or tls.crt/tls.key from --cert-path; server contexts
with the reference's --tls-min-version / --tls-cipher-suites (Go names mapped to OpenSSL);
CertReloader for --enable-cert-reload (and the metrics server's --metrics-cert-dir)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("epp.tls")


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


# Go crypto/tls cipher suite names (tls.CipherSuites() + tls.InsecureCipherSuites()) -> OpenSSL
# names. The TLS 1.3 suites map to None: as in Go, TLS 1.3 suites are not configurable.
GO_CIPHER_SUITES: dict[str, str | None] = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
_SSL_VERSIONS = {"VersionTLS10": ssl.TLSVersion.TLSv1, "VersionTLS11": ssl.TLSVersion.TLSv1_1,
                 "VersionTLS12": ssl.TLSVersion.TLSv1_2, "VersionTLS13": ssl.TLSVersion.TLSv1_3}
CERT_POLL_INTERVAL = 0.5  # seconds between looks at --cert-path's files (--enable-cert-reload)


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """--tls-min-version / --tls-cipher-suites, validated (ValueError names the flag)."""

    min_version: str = ""  # a Go name (VersionTLS12), "" = TLS 1.2 (Go's server default)
    cipher_suites: tuple[str, ...] = ()  # Go names

    def __post_init__(self) -> None:
        if self.min_version and self.min_version not in _SSL_VERSIONS:
            raise ValueError(f"--tls-min-version: unknown TLS version {self.min_version!r}; "
                             f"supported: {', '.join(_SSL_VERSIONS)}")
        unknown = [n for n in self.cipher_suites if n not in GO_CIPHER_SUITES]
        if unknown:
            raise ValueError(f"--tls-cipher-suites: unknown cipher suite {unknown[0]!r} (Go crypto/tls names, "
                             "e.g. TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)")

    def openssl_ciphers(self) -> str:
        return ":".join(c for n in self.cipher_suites if (c := GO_CIPHER_SUITES[n]))


def server_ssl_context(cert_pem: bytes, key_pem: bytes, settings: TLSSettings = TLSSettings(), *,
                       alpn: Sequence[str] = ("h2",), client_ca_file: str = "") -> ssl.SSLContext:
    """A TLS server context from PEM material with the flags' version floor and TLS 1.2
    cipher suites; `client_ca_file` requires client certificates signed by it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _SSL_VERSIONS.get(settings.min_version, ssl.TLSVersion.TLSv1_2)
    legacy = settings.min_version in ("VersionTLS10", "VersionTLS11")
    seclevel = ":@SECLEVEL=0" if legacy else ""  # OpenSSL 3 refuses TLS < 1.2 at its default security level
    if legacy:
        ctx.set_ciphers("DEFAULT" + seclevel)
    ciphers = settings.openssl_ciphers()
    if ciphers:
        try:
            ctx.set_ciphers(ciphers + seclevel)
        except ssl.SSLError:
            raise ValueError(f"--tls-cipher-suites: none of {', '.join(settings.cipher_suites)} is available "
                             "in this OpenSSL build") from None
    _load_chain(ctx, cert_pem, key_pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if client_ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--metrics-client-ca-file: no valid CA certificate in {client_ca_file}: {e}") from None
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="epp-tls-") as d:  # load_cert_chain reads files only
        crt, key = Path(d) / "tls.crt", Path(d) / "tls.key"
        crt.write_bytes(cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        try:
            ctx.load_cert_chain(crt, key)
        except ssl.SSLError as e:
            raise ValueError(f"certificate and key do not load: {e}") from None


def client_context(ca_path: str = "", insecure_skip_verify: bool = False, cert_path: str = "",
                   key_path: str = "") -> ssl.SSLContext:
    """A TLS client context: the server's certificate is verified against `ca_path` (else
    the system CAs) unless `insecure_skip_verify`; `cert_path` + `key_path` are presented
    for mTLS. A file that cannot be used raises ValueError starting with the reference's
    parameter name (caCertPath: or clientCertPath:)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca_path:
        try:
            ctx.load_verify_locations(cafile=ca_path)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"caCertPath: cannot load CA bundle {ca_path}: {e}") from None
    else:
        ctx.load_default_certs()
    if cert_path:
        try:
            ctx.load_cert_chain(cert_path, key_path or None)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"clientCertPath: cannot load client certificate {cert_path} "
                             f"with key {key_path}: {e}") from None
    return ctx


class CertReloader:
    """--enable-cert-reload: watches `cert_path`/tls.crt and tls.key (by stat, so the
    symlink swap of a Kubernetes Secret volume counts) and, once a changed pair loads,
    puts it in every registered SSL context (new connections get it; open ones keep
    theirs) and hands it to grpcio's dynamic credentials on their next handshake. A pair
    that does not load (half written) is retried on the next look; the old one serves."""

    def __init__(self, cert_path: str, *, interval: float = CERT_POLL_INTERVAL) -> None:
        self.dir = Path(cert_path)
        self.interval = interval
        self.contexts: list[ssl.SSLContext] = []
        self.reloads = 0
        self._fetchers: list[object] = []  # one token per grpcio credentials object
        self._grpc_pending: dict[object, grpc.ServerCertificateConfiguration] = {}  # token -> new pair
        self._lock = threading.Lock()
        self._seen = self._signature()
        self._failed_on: tuple | None = None
        self._task: asyncio.Task | None = None

    def _signature(self) -> tuple:
        out = []
        for name in ("tls.crt", "tls.key"):
            try:
                st = os.stat(self.dir / name)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def grpc_credentials(self, cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
        """grpcio credentials that take each reloaded pair on their next handshake (grpc
        calls `fetch` per handshake, on its own threads: None = keep the current pair)."""
        token = object()
        self._fetchers.append(token)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                return self._grpc_pending.pop(token, None)

        initial = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)])
        return grpc.dynamic_ssl_server_credentials(initial, fetch)

    def check(self) -> bool:
        """One look at the files; True when a new pair was installed."""
        sig = self._signature()
        if sig == self._seen:
            return False
        try:
            cert_pem, key_pem = cert_material(str(self.dir))
            server_ssl_context(cert_pem, key_pem, alpn=())  # the pair must load before it replaces anything
        except (ValueError, OSError) as e:
            if self._failed_on != sig:
                log.warning("--enable-cert-reload: new certificate in %s not loaded yet: %s", self.dir, e)
                self._failed_on = sig
            return False
        for ctx in self.contexts:
            _load_chain(ctx, cert_pem, key_pem)
        config = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)])
        with self._lock:
            for token in self._fetchers:
                self._grpc_pending[token] = config
        self._seen = sig
        self.reloads += 1
        log.info("--enable-cert-reload: serving the new certificate from %s", self.dir)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a watcher error must not end serving
                log.exception("--enable-cert-reload: checking %s failed", self.dir)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cert-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
