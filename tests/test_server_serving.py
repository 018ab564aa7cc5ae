"""The reference's serving flags, in process on both ext_proc transports: --enable-cert-reload,
--tls-min-version / --tls-cipher-suites, --grpc-max-recv/send-msg-size, --health-checking,
--metrics-endpoint-auth (against the Kubernetes API stand-in), --metrics-cert-dir /
--metrics-client-ca-file, and the drain of --drain-timeout (health at once, ext_proc kept)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpHeaders, ProcessingRequest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.launch import free_port
from epp.handlers.protocol import SERVICE_NAME
from epp.options import parse_args
from epp.server import PickerServer, StartupError
from epp.tls import self_signed
from tests.kubeapi import KubeApiStandIn
from tests.servers import eventually

BASE = ["--endpoints=127.0.0.1:7", "--grpc-port=0", "--grpc-health-port=0", "--metrics-port=0",
        "--bind-address=127.0.0.1", "--api-port=0"]
TRANSPORTS = ["grpcio", "native"]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., PickerServer]]:
    started: list[PickerServer] = []

    async def start(*flags: str) -> PickerServer:
        server = PickerServer(parse_args([*BASE, f"--metrics-port={free_port()}", *flags]))
        started.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for s in started:
            await s.stop(0)


def write_pair(directory: Path, name: str = "localhost") -> bytes:
    cert, key = self_signed(name)
    (directory / "tls.key").write_bytes(key)
    (directory / "tls.crt").write_bytes(cert)
    return cert


def der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def handshake(port: int, *, max_version: ssl.TLSVersion | None = None, ciphers: str = "",
              alpn: tuple[str, ...] = ("h2",)) -> tuple[bytes, str, str]:
    """(server certificate DER, TLS version, cipher) of a fresh TLS connection (blocking)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers:
        ctx.set_ciphers(ciphers)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.getpeercert(binary_form=True), tls.version(), tls.cipher()[0]


def headers_request(extra: tuple[tuple[str, bytes], ...] = ()) -> ProcessingRequest:
    hs = [HeaderValue(key=":method", raw_value=b"GET"), HeaderValue(key=":path", raw_value=b"/v1/models")]
    hs += [HeaderValue(key=k, raw_value=v) for k, v in extra]
    return ProcessingRequest(request_headers=HttpHeaders(end_of_stream=True, headers=HeaderMap(headers=hs)))


async def ext_proc_status(port: int, request: ProcessingRequest) -> grpc.StatusCode:
    """The status of one ext_proc stream sending `request` (plaintext)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(f"/{SERVICE_NAME}/Process", request_serializer=ProcessingRequest.SerializeToString,
                                response_deserializer=lambda b: b)(timeout=5)
        try:
            await call.write(request)
            await call.read()
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        return await call.code()


# --------------------------------------------------------------------------- cert reload
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cert_reload_serves_the_new_certificate_to_new_connections(serve, tmp_path, transport):
    first = write_pair(tmp_path, "first")
    server = await serve(f"--cert-path={tmp_path}", "--enable-cert-reload", f"--ext-proc-transport={transport}")
    port = server.grpc_port
    assert (await asyncio.to_thread(handshake, port))[0] == der(first)
    second = write_pair(tmp_path, "second")
    seen: list[bytes] = []

    async def new_cert() -> bool:
        seen.append((await asyncio.to_thread(handshake, port))[0])
        return seen[-1] == der(second)

    for _ in range(100):  # each try is a fresh handshake; grpcio takes a new pair at the next one
        if await new_cert():
            break
        await asyncio.sleep(0.1)
    assert seen[-1] == der(second) and server.cert_reloader.reloads == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_without_reload_the_first_certificate_stays(serve, tmp_path, transport):
    first = write_pair(tmp_path, "first")
    server = await serve(f"--cert-path={tmp_path}", f"--ext-proc-transport={transport}")
    write_pair(tmp_path, "second")
    assert server.cert_reloader is None
    assert (await asyncio.to_thread(handshake, server.grpc_port))[0] == der(first)


async def test_a_half_written_pair_keeps_the_old_certificate(tmp_path):
    from epp.tls import CertReloader

    write_pair(tmp_path, "first")
    reloader = CertReloader(str(tmp_path))
    _, other_key = self_signed("other")
    (tmp_path / "tls.key").write_bytes(other_key)  # the key changed, its certificate not yet
    assert reloader.check() is False and reloader.reloads == 0
    write_pair(tmp_path, "second")
    assert reloader.check() is True and reloader.reloads == 1


# --------------------------------------------------------------------------- TLS version and suites
async def test_tls_min_version_13_refuses_a_tls12_client(serve, tmp_path):
    write_pair(tmp_path)
    server = await serve(f"--cert-path={tmp_path}", "--ext-proc-transport=native", "--tls-min-version=VersionTLS13")
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake, server.grpc_port, max_version=ssl.TLSVersion.TLSv1_2)
    assert (await asyncio.to_thread(handshake, server.grpc_port))[1] == "TLSv1.3"


async def test_default_floor_is_tls12_and_suites_restrict_tls12(serve, tmp_path):
    write_pair(tmp_path)
    server = await serve(f"--cert-path={tmp_path}", "--ext-proc-transport=native",
                         "--tls-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384")
    port = server.grpc_port
    _, version, cipher = await asyncio.to_thread(handshake, port, max_version=ssl.TLSVersion.TLSv1_2)
    assert (version, cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
    with pytest.raises(ssl.SSLError):  # a client without that suite
        await asyncio.to_thread(handshake, port, max_version=ssl.TLSVersion.TLSv1_2,
                                ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")


async def assert_refuses_to_start(flags: list[str], match: str) -> None:
    """`epp serve` with BASE and these flags fails at start with a StartupError naming `match`."""
    server = PickerServer(parse_args([*BASE, *flags]))
    try:
        with pytest.raises(StartupError, match=match):
            await server.start()
    finally:
        await server.stop(0)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("flag", ["--grpc-port", "--grpc-health-port", "--metrics-port", "--api-port"])
async def test_a_port_in_use_is_a_start_up_error_naming_its_flag(flag, transport):
    """Each listening port the picker binds, taken by another process: a one-line start-up
    error naming the flag (grpcio raises RuntimeError from add_insecure_port; aiohttp OSError)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        await assert_refuses_to_start(["--secure-serving=false", f"--ext-proc-transport={transport}",
                                       f"{flag}={port}"], f"^{flag}: cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("flag", ["--tls-min-version=VersionTLS13",
                                  "--tls-cipher-suites=TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"])
async def test_grpcio_refuses_tls_settings_it_cannot_honour(flag):
    await assert_refuses_to_start(["--ext-proc-transport=grpcio", flag], "--ext-proc-transport=native")


# --------------------------------------------------------------------------- message sizes
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_grpc_max_recv_msg_size(serve, transport):
    server = await serve("--secure-serving=false", f"--ext-proc-transport={transport}",
                         "--grpc-max-recv-msg-size=1KiB")
    assert await ext_proc_status(server.grpc_port, headers_request()) == grpc.StatusCode.OK
    big = headers_request((("x-filler", b"x" * 2048),))
    assert await ext_proc_status(server.grpc_port, big) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_grpc_max_send_msg_size(serve, transport):
    server = await serve("--secure-serving=false", f"--ext-proc-transport={transport}", "--grpc-max-send-msg-size=8")
    assert await ext_proc_status(server.grpc_port, headers_request()) == grpc.StatusCode.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------- health
async def health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return resp.status


async def test_health_checking_serves_health_on_the_ext_proc_port(serve):
    server = await serve("--secure-serving=false", "--ext-proc-transport=grpcio", "--health-checking")
    assert await health(server.grpc_port, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    await assert_refuses_to_start(["--ext-proc-transport=native", "--health-checking"], "--health-checking")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_drain_reports_not_serving_at_once_and_keeps_serving_ext_proc(serve, transport):
    server = await serve("--secure-serving=false", f"--ext-proc-transport={transport}")
    serving = health_pb2.HealthCheckResponse.SERVING
    await eventually(lambda: server._health_state and server._health_state[0], "synced")  # noqa: SLF001
    assert await health(server.health_port, "readiness") == serving
    interrupted = asyncio.Event()
    drain = asyncio.create_task(server.drain(30, interrupted))
    await eventually(lambda: server.draining, "draining")
    for service in ("", "readiness", SERVICE_NAME, "inference-extension"):
        assert await health(server.health_port, service) == health_pb2.HealthCheckResponse.NOT_SERVING, service
    assert await health(server.health_port, "liveness") == serving  # no restart mid-drain
    assert await ext_proc_status(server.grpc_port, headers_request()) == grpc.StatusCode.OK  # new streams too
    assert not drain.done()
    interrupted.set()  # a second signal ends the window early
    await asyncio.wait_for(drain, 5)


# --------------------------------------------------------------------------- /metrics
def scrape(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def kube():
    with KubeApiStandIn() as api:
        yield api


async def test_metrics_endpoint_auth_by_token_review_and_access_review(kube, tmp_path):
    kube.review_users["reader-token"] = {"username": "system:serviceaccount:monitoring:prometheus",
                                         "uid": "1", "groups": ["system:serviceaccounts"]}
    kube.review_users["other-token"] = {"username": "system:serviceaccount:default:other", "uid": "2"}
    kube.metrics_readers.add("system:serviceaccount:monitoring:prometheus")
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig")
    flags = ["--grpc-port=0", "--grpc-health-port=0", f"--metrics-port={free_port()}", "--bind-address=127.0.0.1",
             "--api-port=0", "--secure-serving=false", "--pool-name=pool", f"--kubeconfig={kc}"]
    server = PickerServer(parse_args(flags))
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        assert await asyncio.to_thread(scrape, url) == 401  # no token
        assert await asyncio.to_thread(scrape, url, "forged") == 401  # TokenReview: not authenticated
        assert await asyncio.to_thread(scrape, url, "other-token") == 403  # authenticated, not allowed
        assert await asyncio.to_thread(scrape, url, "reader-token") == 200
        reviews = len(kube.reviews)
        assert await asyncio.to_thread(scrape, url, "reader-token") == 200
        assert len(kube.reviews) == reviews  # cached, as controller-runtime's delegating filter caches
        sar = [spec for kind, spec in kube.reviews if kind == "SubjectAccessReview"]
        assert {"path": "/metrics", "verb": "get"} in [s["nonResourceAttributes"] for s in sar]
        assert any(s["user"] == "system:serviceaccount:monitoring:prometheus"
                   and s["groups"] == ["system:serviceaccounts"] for s in sar)
        kube.fail_next(1, 500)
        assert await asyncio.to_thread(scrape, url, "new-token") == 500  # the API server could not answer
    finally:
        await server.stop(0)
    off = PickerServer(parse_args([*flags, f"--metrics-port={free_port()}", "--metrics-endpoint-auth=false"]))
    await off.start()
    try:
        assert await asyncio.to_thread(scrape, f"http://127.0.0.1:{off.metrics_port}/metrics") == 200
    finally:
        await off.stop(0)


async def test_static_endpoints_serve_metrics_openly(serve):
    server = await serve("--secure-serving=false")  # auth defaults on: there is no API server to ask
    assert server.metrics_auth is None
    assert await asyncio.to_thread(scrape, f"http://127.0.0.1:{server.metrics_port}/metrics") == 200


def client_ca_and_cert(directory: Path) -> None:
    """ca.pem, and client.crt/client.key signed by it (clientAuth), in `directory`."""
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: str, key, signer, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(build("test-ca", "test-ca", ca_key, ca_key, True).public_bytes(pem))
    (directory / "client.crt").write_bytes(build("prometheus", "test-ca", client_key, ca_key, False).public_bytes(pem))
    (directory / "client.key").write_bytes(client_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                    serialization.NoEncryption()))


async def test_metrics_over_tls_with_client_certificates(serve, tmp_path):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    write_pair(server_dir)
    client_ca_and_cert(tmp_path)
    server = await serve("--secure-serving=false", f"--metrics-cert-dir={server_dir}",
                         f"--metrics-client-ca-file={tmp_path / 'ca.pem'}")
    url = f"https://127.0.0.1:{server.metrics_port}/metrics"
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        await asyncio.to_thread(scrape, url, None, anonymous)
    with_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with_cert.check_hostname, with_cert.verify_mode = False, ssl.CERT_NONE
    with_cert.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
    assert await asyncio.to_thread(scrape, url, None, with_cert) == 200


async def test_drain_releases_the_lease_and_the_old_leader_keeps_serving(kube, tmp_path, monkeypatch):
    from tests.kubeapi import inference_pool

    for name, value in (("EPP_LEASE_DURATION", "2s"), ("EPP_LEASE_RENEW_DEADLINE", "1s"),
                        ("EPP_LEASE_RETRY_PERIOD", "100ms")):
        monkeypatch.setenv(name, value)
    kube.put_pod("vllm-0", "127.0.0.1", {"app": "vllm"})
    kube.apply(inference_pool("pool", {"app": "vllm"}, [8000]))
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig")
    server = PickerServer(parse_args(["--grpc-port=0", "--grpc-health-port=0", "--metrics-port=0",
                                      "--bind-address=127.0.0.1", "--api-port=0", "--secure-serving=false",
                                      "--pool-name=pool", f"--kubeconfig={kc}", "--ha-enable-leader-election"]))
    await server.start()
    try:
        await eventually(lambda: server.is_leader() and server.datastore.synced, "leading and synced")
        assert kube.get("leases", "pool-epp-leader", group="coordination.k8s.io")["spec"]["holderIdentity"]
        interrupted = asyncio.Event()
        drain = asyncio.create_task(server.drain(30, interrupted))
        await eventually(lambda: not server.is_leader(), "lease given up")
        lease = kube.get("leases", "pool-epp-leader", group="coordination.k8s.io")
        assert lease["spec"]["holderIdentity"] == ""  # released: a follower takes over at once
        assert await health(server.health_port, "readiness") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await ext_proc_status(server.grpc_port, headers_request()) == grpc.StatusCode.OK
        interrupted.set()
        await asyncio.wait_for(drain, 5)
    finally:
        await server.stop(0)
