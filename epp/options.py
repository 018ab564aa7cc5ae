"""`epp serve` flags, named as the reference picker's so existing Helm values and
manifests work unchanged: Go-style `--flag=value`, `-flag value` and `--flag=false`
for booleans are accepted. Reference flags this picker does not act on are accepted
and reported at start-up as ignored, never a start-up failure."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from epp.handlers.protocol import DEFAULT_MAX_REQUEST_BODY_BYTES
from epp.telemetry import DEFAULT_MAX_MODEL_LABELS
from epp.units import parse_duration  # flags' type for durations; also imported from here

API_PORT_OFFSET = 10  # native transport: the project API's default port is --grpc-port + 10


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "t", "1", "yes"):
        return True
    if t in ("false", "f", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r}")


class _BoolFlag(argparse.Action):
    """`--flag`, `--flag=true`, `--flag=false` (Go's flag package semantics)."""

    def __init__(self, option_strings, dest, default=False, **kw):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values if isinstance(values, bool) else parse_bool(values))


# Reference flags accepted for compatibility but not acted on.
IGNORED_REFERENCE_FLAGS = (
    "v", "zap-devel", "zap-encoder", "zap-log-level", "zap-stacktrace-level", "zap-time-encoding",
    "enable-pprof", "tracing", "health-checking", "total-queued-requests-metric",
    "total-running-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric",
    "cache-info-metric", "model-server-metrics-scheme", "model-server-metrics-https-insecure-skip-verify",
    "refresh-prometheus-metrics-interval", "kube-api-qps", "kube-api-burst", "grpc-max-recv-msg-size",
    "pool-metrics-ready-pods", "lora-active-metric",
)


@dataclass
class Options:
    grpc_port: int
    grpc_health_port: int
    metrics_port: int
    bind_address: str
    pool_name: str
    pool_namespace: str
    pool_group: str
    endpoint_selector: str
    endpoint_target_ports: list[int]
    endpoints: list[str]
    endpoints_file: str
    config_file: str
    config_text: str
    refresh_metrics_interval: float
    metrics_staleness_threshold: float
    model_server_metrics_port: int
    model_server_metrics_path: str
    secure_serving: bool
    cert_path: str
    ha_enable_leader_election: bool
    disable_endpoint_subset_filter: bool
    log_level: str
    kubeconfig: str
    ignored: list[str]
    ext_proc_transport: str = "grpcio"
    api_port: int = -1  # -1 = the transport's default (grpcio: the ext_proc port; native: + API_PORT_OFFSET), 0 = off
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    metrics_max_model_labels: int = DEFAULT_MAX_MODEL_LABELS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epp serve", description="Endpoint picker for an InferencePool (ext_proc).")
    a = p.add_argument
    a("--grpc-port", type=int, default=9002, help="ext_proc gRPC port (and the project API's, see --api-port)")
    a("--grpc-health-port", type=int, default=9003, help="gRPC health port")
    a("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0 = off)")
    a("--bind-address", default="0.0.0.0", help="address every server listens on")
    a("--pool-name", default="", help="InferencePool to serve (Kubernetes discovery)")
    a("--pool-namespace", default="", help="namespace of the pool (else $NAMESPACE, else default)")
    a("--pool-group", default="inference.networking.k8s.io", help="API group of the InferencePool")
    a("--endpoint-selector", default="", help="standalone mode: pod label selector instead of a pool")
    a("--endpoint-target-ports", default="", help="standalone mode: comma-separated target ports")
    a("--endpoints", default="", help="static endpoints without Kubernetes: ip:port,ip:port")
    a("--endpoints-file", default="", help="YAML file of endpoints, rewrites and objectives (watched)")
    a("--config-file", default="", help="EndpointPickerConfig YAML file")
    a("--config-text", default="", help="EndpointPickerConfig YAML text")
    a("--refresh-metrics-interval", type=parse_duration, default=0.05, help="model-server scrape interval")
    a("--metrics-staleness-threshold", type=parse_duration, default=2.0, help="metrics older than this are stale")
    a("--metrics-max-model-labels", type=int, default=DEFAULT_MAX_MODEL_LABELS,
      help="distinct model names the picker's own metrics label, besides the models the pool knows "
           f"(default {DEFAULT_MAX_MODEL_LABELS}); other names are counted under model_name=\"other\"")
    a("--model-server-metrics-port", type=int, default=0, help="scrape this port instead of the endpoint's")
    a("--model-server-metrics-path", default="/metrics", help="model-server metrics path")
    a("--secure-serving", action=_BoolFlag, default=True, help="serve gRPC over TLS")
    a("--cert-path", default="", help="directory with tls.crt and tls.key (else self-signed)")
    a("--ha-enable-leader-election", action=_BoolFlag, default=False, help="Lease-based leader election")
    a("--disable-endpoint-subset-filter", action=_BoolFlag, default=False, help="ignore Envoy's subset hint")
    a("--ext-proc-transport", choices=["grpcio", "native"], default="grpcio",
      help="ext_proc server: grpcio (grpc.aio), or native (asyncio HTTP/2, less CPU per request; "
           "the project API then moves to --api-port)")
    a("--api-port", type=int, default=-1,
      help="project API gRPC port (ListEndpoints, Explain). It has no authentication: expose it only "
           "inside the cluster, never through the gateway. Default: shares --grpc-port with grpcio, "
           "--grpc-port + 10 with native; 0 = off")
    a("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
      help="largest request body the picker reads, in bytes (default 64 MiB, room for multimodal "
           "bodies); a larger one is answered 413 through Envoy")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a("--kubeconfig", default="", help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    for name in IGNORED_REFERENCE_FLAGS:
        a(f"--{name}", dest=f"ignored_{name.replace('-', '_')}", default=None, nargs="?", const="true",
          help=argparse.SUPPRESS)
    return p


def _normalise(argv: Sequence[str]) -> list[str]:
    """Go accepts `-flag`; argparse wants `--flag` for long names."""
    out = []
    for arg in argv:
        if re.match(r"^-[a-z][a-z0-9-]+(=.*)?$", arg):
            arg = "-" + arg
        out.append(arg)
    return out


def parse_args(argv: Sequence[str]) -> Options:
    parser = build_parser()
    ns = parser.parse_args(_normalise(argv))
    ignored = [n for n in IGNORED_REFERENCE_FLAGS if getattr(ns, f"ignored_{n.replace('-', '_')}") is not None]
    if ns.config_file and ns.config_text:
        parser.error("--config-file and --config-text are mutually exclusive")
    sources = [bool(ns.pool_name), bool(ns.endpoint_selector), bool(ns.endpoints or ns.endpoints_file)]
    if sum(sources) > 1:
        parser.error("use exactly one of --pool-name, --endpoint-selector, --endpoints/--endpoints-file")
    if sum(sources) == 0:
        parser.error("no endpoint source: give --pool-name, --endpoint-selector, or --endpoints/--endpoints-file")
    if ns.endpoints and ns.endpoints_file:
        parser.error("--endpoints and --endpoints-file are mutually exclusive")
    try:
        ports = [int(p) for p in ns.endpoint_target_ports.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--endpoint-target-ports: not a list of ports: {ns.endpoint_target_ports!r}")
    if ns.max_request_body_bytes <= 0:
        parser.error(f"--max-request-body-bytes: must be positive, got {ns.max_request_body_bytes}")
    if ns.metrics_max_model_labels < 0:
        parser.error(f"--metrics-max-model-labels: must be >= 0, got {ns.metrics_max_model_labels}")
    if not -1 <= ns.api_port <= 65535:
        parser.error(f"--api-port: expected a port (0 = off), got {ns.api_port}")
    if ns.endpoint_selector and not ports:
        parser.error("--endpoint-selector needs --endpoint-target-ports")
    computed = {"endpoint_target_ports": ports, "ignored": ignored,
                "endpoints": [e.strip() for e in ns.endpoints.split(",") if e.strip()]}
    # every other field is the flag of the same name
    return Options(**{f.name: computed[f.name] if f.name in computed else getattr(ns, f.name) for f in fields(Options)})
