"""Envoy 1.40 bootstraps for local runs (tests, benchmarks, the demo), and a launcher.

The ext_proc modes follow ../shared/envoy/*.yaml, verified against the real binary:
  full-duplex    FULL_DUPLEX_STREAMED bodies, trailers SEND, ORIGINAL_DST cluster
  buffered       BUFFERED request body, STREAMED response body, ORIGINAL_DST cluster
  override-host  full-duplex + override_host LB policy: a comma list of endpoints gives retry fallback
Any of them with several picker replicas: the ext_proc cluster lists each, round robin.
Plain Envoy load balancing without a picker (what users would otherwise run):
  round-robin, least-request, random over `backends`; direct = one backend.
"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.launch import Process, envoy_binary, free_port, on_fresh_ports, wait_until
from epp.handlers.protocol import DESTINATION_HEADER
from epp.netaddr import parse_hostport

EXT_PROC_MODES = ("full-duplex", "buffered", "override-host")
LB_MODES = {"round-robin": "ROUND_ROBIN", "least-request": "LEAST_REQUEST", "random": "RANDOM", "direct": "ROUND_ROBIN"}


def _addr(hostport: str) -> dict[str, Any]:
    host, port = parse_hostport(hostport, "envoy address", ip=False)
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, backends: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(b)}} for b in backends]}],
        },
        **extra,
    }


def _ext_proc_filter(mode: str, message_timeout: str) -> dict[str, Any]:
    if mode == "buffered":
        processing_mode = {
            "request_header_mode": "SEND", "request_body_mode": "BUFFERED", "request_trailer_mode": "SKIP",
            "response_header_mode": "SEND", "response_body_mode": "STREAMED", "response_trailer_mode": "SKIP",
        }
    else:
        processing_mode = {
            "request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED",
            "request_trailer_mode": "SEND", "response_header_mode": "SEND",
            "response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND",
        }
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}, "timeout": "10s"},
            "failure_mode_allow": False,
            "message_timeout": message_timeout,
            "processing_mode": processing_mode,
            "metadata_options": {
                "receiving_namespaces": {"untyped": ["envoy.lb"]},
                "forwarding_namespaces": {"untyped": ["envoy.lb", "envoy.lb.subset_hint"]},
            },
            "response_attributes": ["upstream.address"],
        },
    }


def _epp_cluster(epp_ports: Sequence[int], tls: bool) -> dict[str, Any]:
    """The picker's cluster: one host, or several replicas behind it (as a Service with several
    EPP pods); each ext_proc stream (one per HTTP request) goes to one replica, round robin."""
    extra: dict[str, Any] = {"lb_policy": "ROUND_ROBIN"} if len(epp_ports) > 1 else {}
    cluster = _static_cluster(
        "epp", [f"127.0.0.1:{p}" for p in epp_ports], **extra,
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    )
    if tls:  # gateways talk TLS to the picker and skip verification of its self-signed cert
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"]},
            },
        }
    return cluster


def _original_dst_cluster() -> dict[str, Any]:
    return {
        "name": "pool",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": {
            "use_http_header": True,
            "http_header_name": DESTINATION_HEADER,
            "metadata_key": {"key": "envoy.lb", "path": [{"key": DESTINATION_HEADER}]},
        },
    }


def _override_host_cluster(backends: list[str]) -> dict[str, Any]:
    rr = {"typed_extension_config": {
        "name": "envoy.load_balancing_policies.round_robin",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"},
    }}
    return _static_cluster("pool", backends, load_balancing_policy={"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
            "override_host_sources": [
                {"metadata": {"key": "envoy.lb", "path": [{"key": DESTINATION_HEADER}]}},
                {"header": DESTINATION_HEADER},
            ],
            "fallback_policy": {"policies": [rr]},
        },
    }}]})


def bootstrap(mode: str, *, listen_port: int, admin_port: int, epp_port: int | Sequence[int] = 0,
              epp_tls: bool = False, backends: list[str] | None = None, buffer_limit: int | None = None,
              message_timeout: str = "10s") -> dict[str, Any]:
    """An Envoy bootstrap (as a dict; JSON is valid YAML) for `mode`; `epp_port` may list
    several picker replicas."""
    epp_ports = [epp_port] if isinstance(epp_port, int) else list(epp_port)
    backends = list(backends or [])
    http_filters: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    route: dict[str, Any] = {"cluster": "pool", "timeout": "0s"}
    if mode in EXT_PROC_MODES:
        if not epp_ports or not all(epp_ports):
            raise ValueError(f"mode {mode} needs epp_port")
        http_filters.append(_ext_proc_filter(mode, message_timeout))
        clusters.append(_epp_cluster(epp_ports, epp_tls))
        if mode == "override-host":
            clusters.append(_override_host_cluster(backends))
            route["retry_policy"] = {"retry_on": "connect-failure,reset,refused-stream", "num_retries": 2}
        else:
            clusters.append(_original_dst_cluster())
        default_limit = 1048576 if mode == "buffered" else 32768
    elif mode in LB_MODES:
        if not backends or (mode == "direct" and len(backends) != 1):
            raise ValueError(f"mode {mode} needs backends (direct: exactly one)")
        clusters.append(_static_cluster("pool", backends, lb_policy=LB_MODES[mode]))
        default_limit = 32768
    else:
        raise ValueError(f"unknown Envoy mode {mode!r}")
    http_filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "inference",
            "stream_idle_timeout": "300s",
            "route_config": {"name": "local", "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
            "http_filters": http_filters,
        },
    }
    return {
        "admin": {"address": _addr(f"127.0.0.1:{admin_port}")},
        "static_resources": {
            "listeners": [{
                "name": "inference",
                "address": _addr(f"127.0.0.1:{listen_port}"),
                "per_connection_buffer_limit_bytes": buffer_limit or default_limit,
                "filter_chains": [{"filters": [hcm]}],
            }],
            "clusters": clusters,
        },
    }


@dataclass
class Envoy:
    """A running Envoy: its listener URL, admin port and process."""

    mode: str
    port: int
    admin_port: int
    process: Process
    config_path: Path
    _tmp: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?format=json", timeout=2) as r:
            data = json.load(r)
        return {s["name"]: s.get("value", 0) for s in data.get("stats", []) if "value" in s}

    def stop(self) -> None:
        self.process.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Envoy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_envoy(mode: str, *, epp_port: int | Sequence[int] = 0, epp_tls: bool = False, backends: list[str] | None = None,
                port: int = 0, concurrency: int = 1, log_dir: str | Path | None = None,
                log_level: str = "warning", timeout: float = 30.0, **bootstrap_kw: Any) -> Envoy:
    """Start Envoy on free 127.0.0.1 ports (the listener on `port` when given) and wait until
    its admin says LIVE and the listener accepts connections."""
    def start() -> Envoy:
        return _start_envoy_once(mode, port or free_port(), epp_port=epp_port, epp_tls=epp_tls, backends=backends,
                                 concurrency=concurrency, log_dir=log_dir, log_level=log_level, timeout=timeout,
                                 **bootstrap_kw)

    return start() if port else on_fresh_ports(start)  # a port the caller chose is not swapped


def _start_envoy_once(mode: str, port: int, *, epp_port: int | Sequence[int], epp_tls: bool,
                      backends: list[str] | None, concurrency: int, log_dir: str | Path | None, log_level: str,
                      timeout: float, **bootstrap_kw: Any) -> Envoy:
    tmp = tempfile.TemporaryDirectory(prefix="epp-envoy-")
    admin_port = free_port()
    config = bootstrap(mode, listen_port=port, admin_port=admin_port, epp_port=epp_port, epp_tls=epp_tls,
                       backends=backends, **bootstrap_kw)
    config_path = Path(tmp.name) / "envoy.json"
    config_path.write_text(json.dumps(config, indent=1))
    log_path = Path(log_dir or tmp.name) / f"envoy-{mode}-{port}.log"
    process = Process(
        [envoy_binary(), "-c", str(config_path), "--concurrency", str(concurrency), "--disable-hot-restart",
         "-l", log_level, "--use-dynamic-base-id"],
        name=f"envoy-{mode}", log_path=log_path,
    )
    envoy = Envoy(mode, port, admin_port, process, config_path, tmp)

    def ready() -> bool:
        if not process.alive():
            return True  # said below, at once (not as a poll's last error after the timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
            return r.status == 200

    try:
        wait_until(ready, timeout, f"envoy ({mode}) on port {port}")
        if not process.alive():
            raise RuntimeError(f"envoy exited: {process.log_tail()}")
    except BaseException:
        envoy.stop()
        raise
    return envoy
