"""The reference's data-layer plugins: metrics-data-source (over http and https with its
TLS parameters), core-metrics-extractor (engine label, default engine, engineConfigs),
endpoint-notification-source, k8s-notification-source (refused), and the runtime that
binds sources to extractors."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest

from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.datalayer.extract import parse_metrics
from epp.datalayer.runtime import DataLayer
from epp.datalayer.specs import DEFAULT_SPECS
from epp.framework import PluginError
from epp.framework.registry import plugin_class
from tests.helpers import plugin
from tests.servers import GOOD_PAGE, RawServer, eventually, length_response


def build(type_name: str, parameters: dict | None = None, name: str | None = None):
    return plugin(type_name, parameters, where="plugins[0]", name=name)


def test_every_data_layer_type_is_registered():
    for t in ("metrics-data-source", "models-data-source", "endpoint-notification-source",
              "k8s-notification-source", "core-metrics-extractor", "models-data-extractor", "file-discovery"):
        assert plugin_class(t).type_name == t


# --------------------------------------------------------------------------- source parameters
def test_metrics_source_defaults_are_the_references():
    src = build("metrics-data-source")
    p = src.params
    assert (p.scheme, p.path, p.port, p.insecureSkipVerify, p.interval) == ("http", "/metrics", None, True, "")
    assert src.ssl_context is None and src.port == 0
    models = build("models-data-source")
    assert (models.params.scheme, models.path, models.params.insecureSkipVerify) == ("http", "/v1/models", True)


@pytest.mark.parametrize("params,key", [
    ({"scheme": "ftp"}, "scheme"),
    ({"port": 0}, "port"),
    ({"port": 70000}, "port"),
    ({"path": "metrics"}, "path"),
    ({"clientCertPath": "/x.pem"}, "clientCertPath"),
    ({"interval": "soon"}, "interval"),
    ({"scheme": "https", "insecureSkipVerify": False, "caCertPath": "/nonexistent/ca.pem"}, "caCertPath"),
    ({"verifyTLS": True}, "verifyTLS"),
])
def test_bad_source_parameters_name_the_key(params, key):
    with pytest.raises(PluginError) as e:
        build("metrics-data-source", params)
    assert f"plugins[0].parameters.{key}" in str(e.value)


def test_interval_is_rounded_to_base_ticks():
    assert build("metrics-data-source", {"interval": "1s"}).interval(0.05) == pytest.approx(1.0)
    assert build("metrics-data-source", {"interval": "120ms"}).interval(0.05) == pytest.approx(0.1)
    assert build("metrics-data-source", {"interval": "10ms"}).interval(0.05) == pytest.approx(0.05)
    assert build("metrics-data-source").interval(0.05) == pytest.approx(0.05)


# --------------------------------------------------------------------------- core-metrics-extractor
def test_core_extractor_defaults_and_engine_configs():
    ex = build("core-metrics-extractor")
    assert ex.engine_label == "llm-d.ai/engine-type" and ex.default_engine == "vllm"
    assert set(ex.specs) == {"vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm", "triton"}
    custom = build("core-metrics-extractor", {
        "engineLabelKey": "example.com/engine", "defaultEngine": "mine",
        "engineConfigs": [{"name": "mine", "queuedRequestsSpec": "q_total", "runningRequestsSpec": "r",
                           "kvUsageSpec": "kv{kind=\"gpu\"}", "cacheInfoSpec": "ci", "cacheBlockSizeLabelName": "bs"},
                          {"name": "vllm", "queuedRequestsSpec": "other_waiting"}]})
    assert custom.engine_label == "example.com/engine" and custom.default_engine == "mine"
    assert custom.specs["vllm"].waiting_queue == "other_waiting" and custom.specs["vllm"].running_requests == ""
    assert custom.specs["sglang"] == DEFAULT_SPECS["sglang"]  # built-ins kept unless redefined
    page = b'q_total 3\nr 2\nkv{kind="cpu"} 0.9\nkv{kind="gpu"} 0.5\nci{bs="32",num_gpu_blocks="10"} 1\n'
    m = parse_metrics(page, custom.specs["mine"], 1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent, m.block_size) == (3, 2, 0.5, 32)


@pytest.mark.parametrize("params,message", [
    ({"defaultEngine": "tgi"}, "defaultEngine: 'tgi' not found"),
    ({"engineConfigs": [{"name": "default"}]}, "engineConfigs[0].name: engine config name cannot be 'default'"),
    ({"engineConfigs": [{"queuedRequestsSpec": "x"}]}, "engineConfigs[0].name: engine config name cannot be empty"),
    ({"engineConfigs": [{"name": "a"}, {"name": "a"}]}, "engineConfigs[1].name: mapping for engine type 'a'"),
    ({"engineConfigs": [{"name": "a", "kvSpec": "x"}]}, "engineConfigs[0].kvSpec: unknown key"),
    ({"engineConfigs": [{"name": "a", "kvUsageSpec": "bad name{"}]}, "engineConfigs[0].kvUsageSpec"),
    ({"engineConfigs": [{"name": "a", "customMetrics": [{"attributeKey": "x", "metricSpec": "y"}]}]},
     "customMetrics: custom scalar metrics feed endpoint-attribute-scorer"),
])
def test_bad_extractor_parameters_name_the_key(params, message):
    with pytest.raises(PluginError) as e:
        build("core-metrics-extractor", params)
    assert message in str(e.value)


TRITON_TRTLLM_PAGE = (
    b'nv_trt_llm_request_metrics{model="m",request_type="waiting",version="1"} 4\n'
    b'nv_trt_llm_request_metrics{model="m",request_type="scheduled",version="1"} 2\n'
    b'nv_trt_llm_request_metrics{model="m",request_type="max",version="1"} 512\n'
    b'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="m",version="1"} 0.375\n'
    b'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="m",version="1"} 64\n'
    b'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="m",version="1"} 9000\n')


def test_builtin_triton_engines_read_their_label_matched_series():
    m = parse_metrics(TRITON_TRTLLM_PAGE, DEFAULT_SPECS["triton-tensorrt-llm"], 1.0)
    assert (m.waiting_queue_size, m.running_requests_size, m.kv_cache_usage_percent,
            m.block_size, m.num_gpu_blocks) == (4, 2, 0.375, 64, 9000)
    t = parse_metrics(b'nv_inference_pending_request_count{model="r"} 5\nnv_inference_exec_count{model="r"} 7\n',
                      DEFAULT_SPECS["triton"], 1.0)
    assert (t.waiting_queue_size, t.running_requests_size, t.kv_cache_usage_percent) == (5, 7, 0.0)


# --------------------------------------------------------------------------- serving pages
def page_server(pages: dict[str, bytes]) -> RawServer:
    async def respond(reader, writer, conn, n, head) -> bool:
        path = head.split(b" ", 2)[1].decode()
        body = pages.get(path)
        writer.write(length_response(body) if body is not None else length_response(b"nope", "404 Not Found"))
        await writer.drain()
        return True
    return RawServer(respond)


SGLANG_PAGE = b"sglang:num_queue_reqs 9\nsglang:num_running_reqs 1\nsglang:token_usage 0.5\n"


async def test_engine_label_key_then_legacy_label_then_default_engine():
    """llm-d.ai/engine-type wins, inference.networking.k8s.io/engine-type is read when it is
    absent, and an unlabelled endpoint is scraped as defaultEngine."""
    page = GOOD_PAGE + SGLANG_PAGE + TRITON_TRTLLM_PAGE
    async with page_server({"/metrics": page}) as s1, page_server({"/metrics": page}) as s2, \
            page_server({"/metrics": page}) as s3:
        ds = Datastore()
        ex = build("core-metrics-extractor", {"defaultEngine": "triton-tensorrt-llm"})
        layer = DataLayer(ds, base_interval=0.02)
        layer.bind(build("metrics-data-source"), [ex])
        ds.replace_all([
            EndpointSpec("new", "127.0.0.1", s1.port, {"llm-d.ai/engine-type": "sglang",
                                                       "inference.networking.k8s.io/engine-type": "vllm"}),
            EndpointSpec("legacy", "127.0.0.1", s2.port, {"inference.networking.k8s.io/engine-type": "sglang"}),
            EndpointSpec("plain", "127.0.0.1", s3.port),
        ])
        await layer.start()
        try:
            await eventually(lambda: all(e.metrics.ok for e in ds.endpoints()), "every endpoint scraped")
            queues = {e.name: e.metrics.waiting_queue_size for e in ds.endpoints()}
            assert queues == {"new": 9, "legacy": 9, "plain": 4}
        finally:
            await layer.stop()


async def test_metrics_source_port_and_path_override():
    async with page_server({"/custom/metrics": GOOD_PAGE}) as server:
        ds = Datastore()
        layer = DataLayer(ds, base_interval=0.02)
        layer.bind(build("metrics-data-source", {"port": server.port, "path": "/custom/metrics"}),
                   [build("core-metrics-extractor")])
        ep = ds.upsert(EndpointSpec("a", "127.0.0.1", 1))  # the endpoint's own port is closed
        await layer.start()
        try:
            await eventually(lambda: ep.metrics.ok, "scraped on the source's port and path")
            assert ep.metrics.waiting_queue_size == 2
        finally:
            await layer.stop()


# --------------------------------------------------------------------------- https
def make_cert(tmp: Path, name: str, *, ca: tuple | None = None, is_ca: bool = False, client: bool = False) -> tuple:
    """(cert path, key path, (cert, key) objects) signed by `ca` or self-signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = ca if ca else (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path), (cert, key)


class TlsPageServer:
    """GOOD_PAGE over https on 127.0.0.1 (optionally requiring a client certificate)."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if client_ca:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.served = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TlsPageServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(length_response(GOOD_PAGE))
                    await writer.drain()
                    self.served += 1
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def scrape_with(params: dict, port: int, until: str) -> tuple:
    ds = Datastore()
    layer = DataLayer(ds, base_interval=0.02)
    layer.bind(build("metrics-data-source", params), [build("core-metrics-extractor")])
    ep = ds.upsert(EndpointSpec("tls", "127.0.0.1", port))
    await layer.start()
    try:
        stats = layer.metrics.stats(ep)
        await eventually(lambda: ep.metrics.ok if until == "ok" else stats.failed >= 2, f"scrape {until}")
        return ep.metrics, stats
    finally:
        await layer.stop()


async def test_https_scrape_verifies_the_server_against_ca_cert_path(tmp_path):
    ca = make_cert(tmp_path, "ca", is_ca=True)
    cert, key, _ = make_cert(tmp_path, "server", ca=ca[2])
    other_ca = make_cert(tmp_path, "other-ca", is_ca=True)
    async with TlsPageServer(cert, key) as server:
        metrics, stats = await scrape_with({"scheme": "https", "insecureSkipVerify": False, "caCertPath": ca[0]},
                                           server.port, "ok")
        assert metrics.waiting_queue_size == 2 and stats.failed == 0
        # The default skips verification (the reference's insecureSkipVerify=true).
        metrics, _ = await scrape_with({"scheme": "https"}, server.port, "ok")
        assert metrics.kv_cache_usage_percent == 0.25
        # A server certificate from another CA is refused, per endpoint, with the reason.
        metrics, stats = await scrape_with({"scheme": "https", "insecureSkipVerify": False,
                                            "caCertPath": other_ca[0]}, server.port, "failing")
        assert not metrics.ok and "CERTIFICATE_VERIFY_FAILED" in stats.last_error
        # Plain http against the TLS port fails too, never hangs.
        metrics, stats = await scrape_with({}, server.port, "failing")
        assert not metrics.ok and stats.last_error


async def test_https_scrape_presents_the_client_certificate_for_mtls(tmp_path):
    ca = make_cert(tmp_path, "ca", is_ca=True)
    cert, key, _ = make_cert(tmp_path, "server", ca=ca[2])
    client_cert, client_key, _ = make_cert(tmp_path, "scraper", ca=ca[2], client=True)
    async with TlsPageServer(cert, key, client_ca=ca[0]) as server:
        metrics, _ = await scrape_with({"scheme": "https", "insecureSkipVerify": False, "caCertPath": ca[0],
                                        "clientCertPath": client_cert, "clientKeyPath": client_key},
                                       server.port, "ok")
        assert metrics.waiting_queue_size == 2
        served = server.served
        metrics, stats = await scrape_with({"scheme": "https", "caCertPath": ca[0]}, server.port, "failing")
        assert not metrics.ok and stats.last_error and server.served == served  # no page without a client cert


def test_unusable_client_certificate_names_the_key(tmp_path):
    (tmp_path / "garbage.pem").write_text("not a certificate")
    with pytest.raises(PluginError, match=r"parameters\.clientCertPath: cannot load client certificate"):
        build("metrics-data-source", {"scheme": "https", "clientCertPath": str(tmp_path / "garbage.pem"),
                                      "clientKeyPath": str(tmp_path / "garbage.pem")})


# --------------------------------------------------------------------------- binding and notifications
def test_binding_checks_what_a_source_yields_against_what_an_extractor_reads():
    layer = DataLayer(Datastore())
    with pytest.raises(ValueError, match=r"sources\[0\]\.extractors\[0\]\.pluginRef: extractor 'models-data-extractor' "
                                         r"reads openai-models, but source 'metrics-data-source' yields prometheus-text"):
        layer.bind(build("metrics-data-source"), [build("models-data-extractor")], "dataLayer.sources[0]")
    with pytest.raises(ValueError, match="needs exactly one extractor"):
        layer.bind(build("models-data-source"), [], "dataLayer.sources[1]")
    with pytest.raises(ValueError, match="does not take endpoint events"):
        layer.bind(build("endpoint-notification-source"), [build("core-metrics-extractor")], "dataLayer.sources[2]")
    with pytest.raises(ValueError, match="is not a data source"):
        layer.bind(build("core-metrics-extractor"), [], "dataLayer.sources[3]")
    layer.bind(build("metrics-data-source"), [build("core-metrics-extractor")], "dataLayer.sources[4]")
    with pytest.raises(ValueError, match="listed twice"):
        layer.bind(build("metrics-data-source"), [build("core-metrics-extractor")], "dataLayer.sources[5]")


def test_k8s_notification_source_parameters_and_static_mode_refusal():
    with pytest.raises(PluginError, match=r"parameters\.kind: version and kind are required"):
        build("k8s-notification-source", {"group": ""})
    src = build("k8s-notification-source", {"version": "v1", "kind": "ConfigMap"})
    assert src.gvk == ("", "v1", "ConfigMap")
    layer = DataLayer(Datastore())
    with pytest.raises(ValueError, match="does not take Kubernetes object events"):
        layer.bind(src, [build("core-metrics-extractor")], "dataLayer.sources[0]")
    layer.bind(src, [Recorder()], "dataLayer.sources[0]")
    layer.check_kubernetes(True)
    with pytest.raises(ValueError, match=r"k8s-notification-source 'k8s-notification-source' needs Kubernetes "
                                         r"discovery \(--pool-name or --endpoint-selector\)"):
        layer.check_kubernetes(False)


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def extract_endpoint(self, event: str, endpoint) -> None:
        self.events.append((event, endpoint.name))
        if endpoint.name == "boom":
            raise RuntimeError("extractor bug")

    def extract_notification(self, event: str, obj: dict) -> None:
        self.events.append((event, obj["metadata"]["name"]))
        if obj["metadata"]["name"] == "boom":
            raise RuntimeError("extractor bug")


async def test_endpoint_notification_source_delivers_add_update_delete():
    ds = Datastore()
    rec = Recorder()
    ds.upsert(EndpointSpec("a", "10.0.0.1", 8000))
    layer = DataLayer(ds)
    layer.bind(build("endpoint-notification-source"), [rec])
    await layer.start()
    assert rec.events == [("upsert", "a")]  # the endpoints present at start
    ds.upsert(EndpointSpec("b", "10.0.0.2", 8000))
    ds.upsert(EndpointSpec("b", "10.0.0.2", 8000, {"llm-d.ai/role": "decode"}))  # relabel: an update
    ds.upsert(EndpointSpec("b", "10.0.0.2", 8000, {"llm-d.ai/role": "decode"}))  # no change: no event
    ds.upsert(EndpointSpec("boom", "10.0.0.3", 8000))  # an extractor failure is logged, discovery goes on
    ds.remove("a")
    assert rec.events == [("upsert", "a"), ("upsert", "b"), ("upsert", "b"), ("upsert", "boom"), ("delete", "a")]
    assert [e.name for e in ds.endpoints()] == ["b", "boom"]
    await layer.stop()


async def test_flags_apply_to_a_default_metrics_source_and_config_parameters_win():
    """The v1.5 flags (path, port; the engineMetrics/metric-name specs) configure a metrics
    source and extractor left at their defaults, as they configured v1.5's implicit
    scraper; parameters given in the config win over them."""
    from epp.datalayer.runtime import ScrapeDefaults

    renamed = {**DEFAULT_SPECS, "vllm": DEFAULT_SPECS["sglang"]}  # the flags rename vllm's series
    async with page_server({"/flag-path": SGLANG_PAGE, "/metrics": GOOD_PAGE}) as server:
        ds = Datastore()
        defaults = ScrapeDefaults(specs=renamed, path="/flag-path", port=server.port)
        layer = DataLayer(ds, base_interval=0.02, scrape_defaults=defaults)
        layer.bind(build("metrics-data-source"), [build("core-metrics-extractor")])
        ep = ds.upsert(EndpointSpec("a", "127.0.0.1", 1))
        errors: list[tuple[str, str, str]] = []
        layer.on_error(lambda *e: errors.append(e))
        await layer.start()
        try:
            await eventually(lambda: ep.metrics.ok, "scraped as the flags say")
            assert ep.metrics.waiting_queue_size == 9  # /flag-path on the flag's port, sglang names
        finally:
            await layer.stop()
        ds = Datastore()
        layer = DataLayer(ds, base_interval=0.02, scrape_defaults=defaults)
        layer.bind(build("metrics-data-source", {"port": server.port}),
                   [build("core-metrics-extractor", {"engineConfigs": [{"name": "vllm",
                                                                         "queuedRequestsSpec": "vllm:num_requests_running"}]})])
        layer.on_error(lambda *e: errors.append(e))
        ep = ds.upsert(EndpointSpec("a", "127.0.0.1", 1))
        await layer.start()
        try:
            await eventually(lambda: ep.metrics.ok, "scraped as the config says")
            assert ep.metrics.waiting_queue_size == 1  # /metrics, the config's spec for vllm
        finally:
            await layer.stop()
    assert not errors
    async with page_server({}) as missing:  # 404 on every path: a poll error per attempt
        ds = Datastore()
        layer = DataLayer(ds, base_interval=0.02)
        layer.bind(build("metrics-data-source"), [build("core-metrics-extractor")])
        layer.on_error(lambda *e: errors.append(e))
        ds.upsert(EndpointSpec("a", "127.0.0.1", missing.port))
        await layer.start()
        try:
            await eventually(lambda: len(errors) >= 2, "poll errors counted")
        finally:
            await layer.stop()
    assert set(errors) == {("poll", "metrics-data-source", "core-metrics-extractor")}


@pytest.mark.parametrize("fixture", ["gie-v1.5-chart-default.yaml", "llm-d-router-chart-gateway.yaml",
                                     "llm-d-router-chart-standalone.yaml", "llm-d-router-chart-payload-agnostic.yaml"])
def test_reference_chart_configs_bind_their_data_layer(fixture):
    """The charts' configs, through the config loader, give sources and extractors that
    the runtime binds: a scraper per metrics source, reading the reference's engine label."""
    from epp.assembly import load_plugin_set
    from epp.framework import PluginHandle

    text = (Path(__file__).parent / "fixtures" / "reference" / "configs" / fixture).read_text()
    plugins = load_plugin_set(text, PluginHandle())
    layer = DataLayer(Datastore())
    for i, (source, extractors) in enumerate(plugins.data_sources):
        layer.bind(source, extractors, f"dataLayer.sources[{i}]")
    assert layer.metrics is not None and layer.metrics.engine_label == "llm-d.ai/engine-type"
    assert layer.metrics.legacy_engine_label == "inference.networking.k8s.io/engine-type"


def test_models_source_polls_with_its_own_tls_and_interval(tmp_path):
    ca = make_cert(tmp_path, "ca", is_ca=True)
    src = build("models-data-source", {"scheme": "https", "insecureSkipVerify": False, "caCertPath": ca[0],
                                       "interval": "5s"})
    assert src.ssl_context is not None and src.ssl_context.verify_mode == ssl.CERT_REQUIRED
    layer = DataLayer(Datastore(), base_interval=0.05)
    layer.bind(src, [build("models-data-extractor")])
    (poller,) = layer.pollers
    assert poller.ssl is src.ssl_context and poller.path == "/v1/models" and poller.interval == pytest.approx(5.0)
    assert poller._client(Datastore().upsert(EndpointSpec("a", "127.0.0.1", 8000))).url("/v1/models") == \
        "https://127.0.0.1:8000/v1/models"  # noqa: SLF001
