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
from epp.framework import PluginHandle
from epp.framework.metrics import PluginMetrics
from epp.handlers.grpcio import add_ext_proc_server
from epp.handlers.protocol import SERVICE_NAME
from epp.handlers.stream import ExtProcHandler
from epp.netaddr import join_hostport
from epp.options import API_PORT_OFFSET, Options, parse_args
from epp.requestcontrol.director import Director
from epp.telemetry import Telemetry

log = logging.getLogger("epp.server")

MAX_MESSAGE = 128 * 1024 * 1024  # BUFFERED mode sends a whole body in one message
GRPC_OPTIONS = (
    ("grpc.so_reuseport", 0),  # a stale server on the same port must not silently take connections
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
)
HEALTH_SERVICES = ("", "liveness", "readiness", "inference-extension", SERVICE_NAME)
_LEADER_ONLY = ("readiness", SERVICE_NAME)


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
        self.telemetry = Telemetry(registry, max_model_labels=options.metrics_max_model_labels)
        try:
            self.pipeline = load_plugin_set(read_config_text(options),
                                            PluginHandle(metrics=PluginMetrics(self.telemetry.registry)),
                                            observe=self.telemetry.plugin_observer())
        except ConfigError as e:
            raise StartupError(f"config error: {e}") from None
        self.datastore.on_endpoints_removed(self.pipeline.endpoints_removed)
        p = self.pipeline
        self.admission = AdmissionController(p.saturation_detector,
                                             flow_control=gated_flow_control(p.feature_gates, p.flow_control))
        self.admission.observe_queue_duration = self._observe_queue
        self.director = Director(self.datastore, self.pipeline, admission=self.admission, telemetry=self.telemetry,
                                 staleness=options.metrics_staleness_threshold)
        self.ext_proc = ExtProcHandler(self.director, disable_subset_filter=options.disable_endpoint_subset_filter,
                                       serving=self.is_leader, max_request_body_bytes=options.max_request_body_bytes)
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
        self._health_state: tuple[bool, bool] | None = None

    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def _observe_queue(self, seconds: float, priority: int, outcome: str) -> None:
        self.telemetry.flow_control_queue_duration.get("", priority, outcome).observe(seconds)

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
        from epp.datalayer.collector import MetricsCollector
        from epp.datalayer.specs import specs_from_config

        try:
            specs = specs_from_config(self.pipeline.engine_metrics)
        except ValueError as e:
            raise StartupError(f"config error: {e}") from None
        if o.pool_name or o.endpoint_selector:
            from epp.discovery.kubernetes import KubernetesDiscovery

            if o.ha_enable_leader_election:
                from epp.discovery.leader import LeaderElector

                self.elector = LeaderElector(o, identity=f"{socket.gethostname()}-{os.getpid()}",
                                             on_change=self._leader_changed)
                await self.elector.start()
            self.discovery = KubernetesDiscovery(self.datastore, o)
        else:
            from epp.discovery.static import StaticDiscovery

            self.discovery = StaticDiscovery(self.datastore, endpoints=o.endpoints, file=o.endpoints_file)
        try:
            await self.discovery.start()
        except ValueError as e:
            raise StartupError(str(e)) from None
        self.collector = MetricsCollector(self.datastore, interval=o.refresh_metrics_interval, specs=specs,
                                          port_override=o.model_server_metrics_port,
                                          path=o.model_server_metrics_path)
        await self.collector.start()

    async def _start_grpc(self) -> None:
        o = self.options
        cert: tuple[bytes, bytes] | None = None
        if o.secure_serving:
            from epp.tls import cert_material

            try:
                cert = cert_material(o.cert_path)
            except ValueError as e:
                raise StartupError(str(e)) from None
        if o.ext_proc_transport == "native":
            await self._start_native(cert)
        else:
            server = self.grpc_server = grpc.aio.server(options=GRPC_OPTIONS)
            add_ext_proc_server(server, self.ext_proc)
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
        if cert is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(cert[1], cert[0])]))
        else:
            bound = server.add_insecure_port(address)
        if not bound:
            raise StartupError(f"{flag}: cannot listen on {address}")
        return bound

    async def _start_native(self, cert: tuple[bytes, bytes] | None) -> None:
        """ext_proc on epp.handlers.h2.server; the project API (grpc.aio) cannot share that port."""
        from epp.handlers.h2.server import H2GrpcServer, ssl_context

        o = self.options
        self.native = H2GrpcServer(self.ext_proc, ssl_context=ssl_context(*cert) if cert else None)
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
        add_api_servicer(server, ApiServicer(self.datastore, self.director.explain))

    async def _start_health(self) -> None:
        o = self.options
        server = self.health_server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = join_hostport(o.bind_address, o.grpc_health_port)
        self.health_port = server.add_insecure_port(address)
        if not self.health_port:
            raise StartupError(f"--grpc-health-port: cannot listen on {address}")
        await server.start()
        await self._update_health()
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop(), name="health")

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            await self._update_health()

    async def _update_health(self) -> None:
        state = (bool(self.datastore.synced), self.is_leader())
        if state == self._health_state:
            return
        self._health_state = state
        synced, leader = state
        for service in HEALTH_SERVICES:
            ok = synced and (leader or service not in _LEADER_ONLY)
            if service == "liveness":
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

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = self.metrics_runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, o.bind_address, o.metrics_port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # noqa: SLF001 - the bound port when 0
        self.metrics_port = sockets[0].getsockname()[1] if sockets else o.metrics_port

    async def stop(self, grace: float = 2.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
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
        if self.elector is not None:
            await self.elector.stop()
        await self.admission.close()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()

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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await picker.start()
        print(picker.ready_line(), flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await picker.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=options.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if options.ignored:
        log.info("ignoring reference flags not used by this picker: %s",
                 ", ".join(f"--{n}" for n in options.ignored))
    try:
        return asyncio.run(serve(options))
    except StartupError as e:
        print(f"epp serve: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
