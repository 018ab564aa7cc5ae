"""`epp serve`: assembles the picker.

ext_proc on --grpc-port, TLS by default, served by grpc.aio or, with
--ext-proc-transport=native, by epp.handlers.h2.server; the project API (unauthenticated)
by grpc.aio on its own --api-port when one is given (0 = off), else on --grpc-port with
grpcio and on --grpc-port + 10 with native; gRPC health on
--grpc-health-port; Prometheus metrics over HTTP on --metrics-port; the endpoint source
(static flags/file or Kubernetes), the metrics scraper and, optionally, leader election
as background producers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp.assembly import load_plugin_set
from epp.config import ConfigError
from epp.datalayer.datastore import Datastore
from epp.flowcontrol.admission import AdmissionController, gated_flow_control
from epp.flowcontrol.eviction import EvictionMetrics, build_eviction
from epp.framework import PluginHandle
from epp.framework.metrics import PluginMetrics
from epp.handlers.grpcio import add_ext_proc_server
from epp.handlers.protocol import SERVICE_NAME
from epp.handlers.stream import ExtProcHandler
from epp.netaddr import join_hostport
from epp.options import API_PORT_OFFSET, FLAG_BY_NAME, METRIC_FLAGS, Options, parse_args
from epp.requestcontrol.director import Director
from epp.telemetry import DEFAULT_POOL_LABEL, Telemetry
from epp.tracing import TracingError
from epp.tracing import init as init_tracing
from epp.tracing import observer as tracing_observer

log = logging.getLogger("epp.server")

MAX_MESSAGE = 128 * 1024 * 1024  # BUFFERED mode sends a whole body in one message
GRPC_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a stale server on the same port must not silently take connections
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
)
HEALTH_SERVICES = ("", "liveness", "readiness", "inference-extension", SERVICE_NAME)
_LEADER_ONLY = ("readiness", SERVICE_NAME)
STOP_GRACE = 5.0  # after the drain window: how long in-flight streams still get before they are cut


class StartupError(Exception):
    """A start-up problem the operator must fix; printed as one line, exit code 2."""


def read_config_text(options: Options) -> str | None:
    if options.config_text:
        return options.config_text
    if options.config_file:
        try:
            return Path(options.config_file).read_text()
        except OSError as e:
            raise StartupError(f"--config-file: cannot read {options.config_file}: {e.strerror}") from None
    return None


class PickerServer:
    """Everything `epp serve` runs, startable in-process (tests) or from main()."""

    def __init__(self, options: Options, *, registry: Any = None) -> None:
        self.options = options
        self.datastore = Datastore()
        self.telemetry = Telemetry(registry, max_model_labels=options.metrics_max_model_labels,
                                   grpc_stream_metrics=options.enable_grpc_stream_metrics)
        try:
            self.tracing = init_tracing(options.tracing)  # None: --tracing=false or no OpenTelemetry SDK
        except TracingError as e:
            raise StartupError(str(e)) from None
        try:
            self.pipeline = load_plugin_set(read_config_text(options),
                                            PluginHandle(metrics=PluginMetrics(self.telemetry.registry),
                                                         endpoints=self.datastore.endpoints),
                                            observe=tracing_observer(self.tracing, self.telemetry.plugin_observer()),
                                            allow_experimental_plugins=options.allow_experimental_plugins)
        except ConfigError as e:
            raise StartupError(f"config error: {e}") from None
        self.datastore.on_endpoints_removed(self.pipeline.endpoints_removed)
        p = self.pipeline
        flow_control = gated_flow_control(p.feature_gates, p.flow_control)
        eviction_metrics = EvictionMetrics(self.telemetry.registry, options.pool_name or DEFAULT_POOL_LABEL)
        evictor, reclamation = build_eviction(p.saturation_detector, options.refresh_metrics_interval,
                                              options.metrics_staleness_threshold, eviction_metrics) \
            if flow_control is not None and flow_control.enable_eviction else (None, None)
        self.admission = AdmissionController(p.saturation_detector, policies=p.plugins, pool=self.datastore.endpoints,
                                             flow_control=flow_control, reclamation=reclamation)
        self.admission.observe_flow = self.telemetry.flow_control_observer()
        self.admission.observe_dispatch_cycle = self.telemetry.flow_control_dispatch_cycle.observe
        self.director = Director(self.datastore, self.pipeline, admission=self.admission, telemetry=self.telemetry,
                                 staleness=options.metrics_staleness_threshold,
                                 parsers=self.pipeline.parsers or None,  # requestHandler.parsers
                                 tracing=self.tracing, emit_endpoint_scores=options.emit_endpoint_scores)
        self.pipeline.scheduler.collect_scores = options.emit_endpoint_scores  # only then: nothing collected off
        self.ext_proc = ExtProcHandler(self.director, disable_subset_filter=options.disable_endpoint_subset_filter,
                                       serving=self._serving, max_request_body_bytes=options.max_request_body_bytes,
                                       evictor=evictor)
        self.telemetry.add_pool_collector(self.datastore, options.pool_name or "static",
                                          options.metrics_staleness_threshold)
        self.telemetry.add_picker_collector(self.admission)
        self.elector: Any = None
        self.discovery: Any = None
        self.collector: Any = None
        self.grpc_server: grpc.aio.Server | None = None  # grpcio ext_proc (and the API when it shares the port)
        self.api_server: grpc.aio.Server | None = None  # the API on its own --api-port
        self.native: Any = None  # epp.handlers.h2.server.H2GrpcServer with --ext-proc-transport=native
        self.api_port = 0
        self.health_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.metrics_runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.health_port = 0
        self.metrics_port = 0
        self._health_task: asyncio.Task | None = None
        self._health_state: tuple[bool, bool, bool] | None = None
        self.draining = False  # set at SIGTERM: health NOT_SERVING, ext_proc still served (--drain-timeout)
        self._led_at_drain = False
        self.cert_reloader: Any = None  # epp.tls.CertReloader with --enable-cert-reload
        self.metrics_cert_reloader: Any = None  # the same for --metrics-cert-dir
        self.tls_settings: Any = None  # epp.tls.TLSSettings with --secure-serving
        self.metrics_auth: Any = None  # epp.discovery.kubeclient.MetricsAuthorizer with --metrics-endpoint-auth

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def _serving(self) -> bool:
        """ext_proc streams are served by the leader, and while draining by the pod that led
        when the drain began (it has released the lease by then)."""
        return self.is_leader() or (self.draining and self._led_at_drain)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        o = self.options
        await self._start_sources()
        await self._start_grpc()
        await self._start_health()
        if o.metrics_port > 0:  # 0 = off
            await self._start_metrics()

    async def _start_sources(self) -> None:
        o = self.options
        from epp.datalayer.runtime import DataLayer, ScrapeDefaults
        from epp.datalayer.specs import specs_from_config

        try:
            specs = specs_from_config(self.pipeline.engine_metrics)
        except ValueError as e:
            raise StartupError(f"config error: {e}") from None
        specs = apply_metric_flags(specs, o.engine_metric_flags)
        # dataLayer: every configured source with its extractors (the config adds the reference's
        # default metrics source); the flags and engineMetrics set what a default source leaves open
        layer = DataLayer(self.datastore, base_interval=o.refresh_metrics_interval, scrape_defaults=ScrapeDefaults(
            specs=specs, path=o.model_server_metrics_path, port=o.model_server_metrics_port, ssl=scrape_tls(o)))
        configured = self.pipeline.discovery  # dataLayer.discovery wins over the pool flags, as in the reference
        try:
            for i, (source, extractors) in enumerate(self.pipeline.data_sources):
                layer.bind(source, extractors, where=f"dataLayer.sources[{i}]")
            layer.check_kubernetes(configured is None and bool(o.pool_name or o.endpoint_selector))
        except ValueError as e:
            raise StartupError(f"config error: {e}") from None
        if configured is not None:
            self.discovery = configured.discovery(self.datastore)
        elif o.pool_name or o.endpoint_selector:
            from epp.discovery.kubernetes import KubernetesDiscovery

            if o.ha_enable_leader_election:
                from epp.discovery.leader import LeaderElector

                self.elector = LeaderElector(o, identity=f"{socket.gethostname()}-{os.getpid()}",
                                             on_change=self._leader_changed)
                await self.elector.start()
            self.discovery = KubernetesDiscovery(self.datastore, o)
        else:
            from epp.discovery.static import StaticDiscovery

            if not (o.endpoints or o.endpoints_file):
                raise StartupError("no endpoint source: give --pool-name, --endpoint-selector, "
                                   "--endpoints/--endpoints-file, or a dataLayer.discovery plugin in the config")
            self.discovery = StaticDiscovery(self.datastore, endpoints=o.endpoints, file=o.endpoints_file)
        try:
            await self.discovery.start()
            if layer.notifications:  # k8s-notification-sources watch with Kubernetes discovery's client
                await layer.start_notifications(self.discovery.api, self.discovery.namespace)
        except ValueError as e:
            raise StartupError(str(e)) from None
        self.collector = layer
        layer.on_error(self.telemetry.datalayer_error)
        await layer.start()
        for plugin in self.pipeline.plugins.values():  # background work a plugin owns (e.g. KV-event sockets)
            start = getattr(plugin, "start_background", None)
            if start is not None:
                await start()

    async def _start_grpc(self) -> None:
        o = self.options
        cert: tuple[bytes, bytes] | None = None
        if o.secure_serving:
            from epp.tls import CertReloader, TLSSettings, cert_material

            try:
                cert = cert_material(o.cert_path)
                self.tls_settings = TLSSettings(o.tls_min_version, tuple(o.tls_cipher_suites))
            except ValueError as e:
                raise StartupError(str(e)) from None
            if o.enable_cert_reload and o.cert_path:
                self.cert_reloader = CertReloader(o.cert_path)
        if o.ext_proc_transport == "native":
            if o.health_checking:
                raise StartupError("--health-checking: gRPC health on the ext_proc port needs "
                                   "--ext-proc-transport=grpcio (the native transport serves only ext_proc; "
                                   "health is on --grpc-health-port)")
            await self._start_native(cert)
        else:
            if cert is not None:
                self._check_grpcio_tls()
            server = self.grpc_server = grpc.aio.server(options=grpc_options(o))
            add_ext_proc_server(server, self.ext_proc)
            if o.health_checking:  # the reference's --health-checking: health also on the ext_proc port
                health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            if o.api_port < 0:  # grpcio's default: the API shares the ext_proc port
                self._add_api(server)
            self.grpc_port = self._add_port(server, o.grpc_port, cert, "--grpc-port")
            await server.start()
        api_port = self._own_api_port()
        if api_port is not None:
            server = self.api_server = grpc.aio.server(options=GRPC_OPTIONS)
            self._add_api(server)
            self.api_port = self._add_port(server, api_port, cert, "--api-port")
            await server.start()
        if self.cert_reloader is not None:
            self.cert_reloader.start()

    def _check_grpcio_tls(self) -> None:
        """grpcio's TLS (BoringSSL) has a fixed floor of TLS 1.2 and no cipher list: what it
        cannot honour stops start-up rather than being served quietly."""
        o = self.options
        if o.tls_min_version == "VersionTLS13":
            raise StartupError("--tls-min-version=VersionTLS13: the grpcio transport cannot raise its TLS floor "
                               "above 1.2; use --ext-proc-transport=native")
        if o.tls_cipher_suites:
            raise StartupError("--tls-cipher-suites: the grpcio transport cannot restrict its cipher suites; "
                               "use --ext-proc-transport=native")

    def _own_api_port(self) -> int | None:
        """The project API's own port (0 = any free one), or None when it has none: off
        (--api-port=0), or sharing the ext_proc port (grpcio's default)."""
        o = self.options
        if o.api_port > 0:
            return o.api_port
        if o.api_port == 0 or o.ext_proc_transport != "native":
            return None
        return o.grpc_port + API_PORT_OFFSET if o.grpc_port else 0

    def _add_port(self, server: grpc.aio.Server, port: int, cert: tuple[bytes, bytes] | None, flag: str) -> int:
        address = join_hostport(self.options.bind_address, port)
        creds = None
        if cert is not None:
            if self.cert_reloader is not None:
                creds = self.cert_reloader.grpc_credentials(cert[0], cert[1])
            else:
                creds = grpc.ssl_server_credentials([(cert[1], cert[0])])
        return _grpc_port(server, address, flag, creds)

    async def _start_native(self, cert: tuple[bytes, bytes] | None) -> None:
        """ext_proc on epp.handlers.h2.server; the project API (grpc.aio) cannot share that port."""
        from epp.handlers.h2.server import H2GrpcServer
        from epp.tls import server_ssl_context

        o = self.options
        context = None
        if cert is not None:
            try:
                context = server_ssl_context(*cert, self.tls_settings)
            except ValueError as e:
                raise StartupError(str(e)) from None
            if self.cert_reloader is not None:
                self.cert_reloader.contexts.append(context)
        self.native = H2GrpcServer(self.ext_proc, ssl_context=context,
                                   max_message=o.grpc_max_recv_msg_size or None)
        self.native.max_send_message = o.grpc_max_send_msg_size
        try:
            self.grpc_port = await self.native.start(o.bind_address, o.grpc_port)
        except OSError as e:
            raise StartupError(f"--grpc-port: cannot listen on {o.bind_address}:{o.grpc_port}: {e.strerror}") \
                from None

    def _add_api(self, server: grpc.aio.Server) -> None:
        try:
            from epp.handlers.api import ApiServicer, add_api_servicer
        except ImportError:  # the project API is optional for ext_proc
            log.warning("project API (epp.handlers.api) not available; serving ext_proc only")
            return
        reporters = [f for f in (getattr(p, "endpoint_status", None) for p in self.pipeline.plugins.values()) if f]
        add_api_servicer(server, ApiServicer(self.datastore, self.director.explain, endpoint_status=(
            (lambda ep: {k: v for f in reporters for k, v in f(ep).items()}) if reporters else None)))

    async def _start_health(self) -> None:
        o = self.options
        server = self.health_server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.health_port = _grpc_port(server, join_hostport(o.bind_address, o.grpc_health_port), "--grpc-health-port")
        await server.start()
        await self._update_health()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="health")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self._update_health()

    async def _update_health(self) -> None:
        state = (bool(self.datastore.synced), self.is_leader(), self.draining)
        if state == self._health_state:
            return
        self._health_state = state
        synced, leader, draining = state
        for service in HEALTH_SERVICES:
            ok = synced and (leader or service not in _LEADER_ONLY) and not draining
            if service == "liveness":  # stays SERVING while draining: no restart mid-drain
                ok = True
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING if ok
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _leader_changed(self, leader: bool) -> None:
        log.info("leader election: %s", "became leader" if leader else "not the leader")

    async def _start_metrics(self) -> None:
        o = self.options
        registry = self.telemetry.registry

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        middlewares = []
        if o.metrics_endpoint_auth and (o.pool_name or o.endpoint_selector):
            from epp.discovery.kubeclient import MetricsAuthorizer, load_api_client

            try:
                self.metrics_auth = MetricsAuthorizer(await asyncio.to_thread(load_api_client, o.kubeconfig))
            except ValueError as e:
                raise StartupError(f"--metrics-endpoint-auth: {e}") from None
            middlewares.append(self._metrics_auth_middleware)
        elif o.metrics_endpoint_auth:
            log.info("--metrics-endpoint-auth: no Kubernetes API with static endpoints, so /metrics is served "
                     "without authentication (as the reference's file-discovery mode)")
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/metrics", metrics)
        runner = self.metrics_runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, o.bind_address, o.metrics_port, ssl_context=self._metrics_tls())
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"--metrics-port: cannot listen on {join_hostport(o.bind_address, o.metrics_port)}: "
                               f"{e.strerror}") from None
        sockets = site._server.sockets if site._server else []  # noqa: SLF001 - the bound port when 0
        self.metrics_port = sockets[0].getsockname()[1] if sockets else o.metrics_port

    def _metrics_tls(self) -> Any:
        """--metrics-cert-dir: /metrics over TLS (1.2+, the files watched and reloaded as
        controller-runtime's certwatcher does); --metrics-client-ca-file: client certs required."""
        o = self.options
        if not o.metrics_cert_dir:
            return None
        from epp.tls import CertReloader, cert_material, server_ssl_context

        try:
            context = server_ssl_context(*cert_material(o.metrics_cert_dir), alpn=(),
                                         client_ca_file=o.metrics_client_ca_file)
        except ValueError as e:
            raise StartupError(f"--metrics-cert-dir: {e}") from None
        self.metrics_cert_reloader = CertReloader(o.metrics_cert_dir)
        self.metrics_cert_reloader.contexts.append(context)
        self.metrics_cert_reloader.start()
        return context

    @web.middleware
    async def _metrics_auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        status, message = await asyncio.to_thread(self.metrics_auth.decide, request.headers.get("Authorization", ""),
                                                  request.method.lower(), request.path)
        if status != 200:
            return web.Response(status=status, text=message + "\n")
        return await handler(request)

    async def drain(self, timeout: float, interrupted: asyncio.Event | None = None) -> None:
        """--drain-timeout, as the reference's graceful shutdown: health reports NOT_SERVING
        at once (liveness excepted) and the leader lease is released, while ext_proc keeps
        serving, new streams included (Envoy routes to the pod until it sees the readiness
        change), for `timeout` seconds or until `interrupted` is set."""
        self._led_at_drain = self.is_leader()
        self.draining = True
        if self._health_task is not None:
            await self._update_health()
        log.info("draining: NOT_SERVING, ext_proc served for up to %gs more", timeout)
        if self.elector is not None:
            await self.elector.stop()  # releases the lease: a follower takes over at once
        if timeout > 0:
            waiter = interrupted or asyncio.Event()
            try:
                await asyncio.wait_for(waiter.wait(), timeout)
            except TimeoutError:
                pass
        log.info("drain window over: stopping")

    async def stop(self, grace: float = 2.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for reloader in (self.cert_reloader, self.metrics_cert_reloader):
            if reloader is not None:
                await reloader.stop()
        if self.native is not None:
            await self.native.stop(grace)
        for server in (self.grpc_server, self.api_server):
            if server is not None:
                await server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        for part in (self.collector, self.discovery):
            if part is not None:
                await part.stop()
        for plugin in self.pipeline.plugins.values():
            stop = getattr(plugin, "stop_background", None)
            if stop is not None:
                await stop()
        if self.elector is not None:
            await self.elector.stop()
        await self.admission.close()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        if self.tracing is not None:  # exports what is queued (the exporter's timeout bounds it)
            await asyncio.to_thread(self.tracing.shutdown)

    def ready_line(self) -> str:
        o = self.options
        if self.native is not None:
            native = f" ext_proc=native api={self.api_port or 'off'}"
        else:
            native = f" api={self.api_port}" if self.api_port else (" api=off" if o.api_port == 0 else "")
        return (f"epp: ready grpc={o.bind_address}:{self.grpc_port} ({'tls' if o.secure_serving else 'plaintext'})"
                f" health={self.health_port} metrics={self.metrics_port} endpoints={len(self.datastore.endpoints())}"
                f"{native}")


async def serve(options: Options) -> int:
    picker = PickerServer(options)
    stop, again = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:  # the first SIGTERM/SIGINT drains; a second one ends the drain
        (again if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await picker.start()
        print(picker.ready_line(), flush=True)
        await stop.wait()
        log.info("stopping")
        await picker.drain(options.drain_timeout, again)
    finally:
        await picker.stop(STOP_GRACE)
    return 0


def _grpc_port(server: grpc.aio.Server, address: str, flag: str, creds: grpc.ServerCredentials | None = None) -> int:
    """Bind a grpc.aio server's port; a port that cannot be bound (grpcio returns 0 or, in
    newer releases, raises RuntimeError) is a start-up error naming the flag."""
    try:
        bound = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as e:
        raise StartupError(f"{flag}: cannot listen on {address}: {e}") from None
    if not bound:
        raise StartupError(f"{flag}: cannot listen on {address}")
    return bound


def grpc_options(options: Options) -> tuple[tuple[str, Any], ...]:
    """grpcio server options for the ext_proc server: --grpc-max-recv/send-msg-size."""
    recv = options.grpc_max_recv_msg_size or MAX_MESSAGE
    send = options.grpc_max_send_msg_size or MAX_MESSAGE
    return (("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", recv),
            ("grpc.max_send_message_length", send))


def scrape_tls(options: Options) -> Any:
    """--model-server-metrics-scheme=https (v1.5): the scrape's TLS context, verifying the
    model servers' certificates unless --model-server-metrics-https-insecure-skip-verify
    (default true, as the reference)."""
    if options.model_server_metrics_scheme != "https":
        return None
    from epp.tls import client_context

    return client_context(insecure_skip_verify=options.model_server_metrics_https_insecure_skip_verify)


def apply_metric_flags(specs: dict[str, Any], flags: dict[str, str]) -> dict[str, Any]:
    """The v1.5 metric-name flags rename the default engine's series (pods without an
    engine label), as they named every pod's before v1.5; a project superset (the
    reference refuses them since v1.5.0)."""
    if not flags:
        return specs
    import dataclasses

    from epp.datalayer.specs import DEFAULT_ENGINE, parse_series

    changes: dict[str, Any] = {}
    for field_name, name in flags.items():
        flag = next(f for f, v in METRIC_FLAGS.items() if v == field_name)
        if name:
            try:
                parse_series(name)
            except ValueError as e:
                raise StartupError(f"--{flag}: {e}") from None
        if not name and field_name in ("waiting_queue", "running_requests", "kv_cache_usage"):
            raise StartupError(f"--{flag}: must not be empty")
        changes[field_name] = (name,) if field_name == "kv_cache_usage" else name
    specs = dict(specs)
    specs[DEFAULT_ENGINE] = dataclasses.replace(specs[DEFAULT_ENGINE], **changes)
    log.info("metric-name flags (%s) rename the %s engine's series", ", ".join(f"--{f}" for f in METRIC_FLAGS
             if METRIC_FLAGS[f] in flags), DEFAULT_ENGINE)
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=options.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if options.ignored:
        log.info("ignoring reference flags not used by this picker: %s",
                 "; ".join(f"--{n} ({FLAG_BY_NAME[n].ignored})" for n in options.ignored))
    try:
        return asyncio.run(serve(options))
    except StartupError as e:
        print(f"epp serve: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
