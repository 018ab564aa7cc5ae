"""`epp serve` flags, named as the reference picker's so existing Helm values and
manifests work unchanged.

Every flag of both reference generations (llm-d-router's cmd/epp and GIE v1.5's, listed
in tests/fixtures/reference/flags*.txt) is in the one table FLAGS below, with the
reference's type and default, in pflag's forms: `--flag=value`, `--flag value`, bools as a
bare `--flag` or `--flag=false`, Go's single-dash `-flag value`, and `-v=2` / `-v 2`.
A flag is one of:
- acted on: a field of Options of the same name;
- ignored: it has no meaning here (another logger's verbosity, pprof, ...); logged once
  at start-up when given, never fatal;
- refused at start-up, naming what is missing, when a value asks for what this picker
  cannot give (e.g. --health-checking with the native transport, --tls-min-version=
  VersionTLS13 with grpcio: epp.server).
The five v1.5 metric-name flags (the reference rejects them since v1.5.0) are a project
superset: they rename the default engine's series, as they did before v1.5.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from epp.handlers.protocol import DEFAULT_MAX_REQUEST_BODY_BYTES
from epp.telemetry import DEFAULT_MAX_MODEL_LABELS
from epp.units import UnitError, parse_duration, parse_quantity  # parse_duration is also imported from here

API_PORT_OFFSET = 10  # native transport: the project API's default port is --grpc-port + 10
MAX_TARGET_PORTS = 8  # the reference's bound on --endpoint-target-ports
DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds (reference DefaultDrainTimeout)
MIN_REFRESH_METRICS_INTERVAL = 0.05  # the reference clamps --refresh-metrics-interval up to this

# Go crypto/tls version names (the reference's --tls-min-version values).
TLS_VERSIONS = ("VersionTLS10", "VersionTLS11", "VersionTLS12", "VersionTLS13")


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
        try:
            setattr(namespace, self.dest, values if isinstance(values, bool) else parse_bool(values))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None


class _SliceFlag(argparse.Action):
    """pflag's intSlice/stringSlice: comma-separated; a repeated flag appends."""

    def __init__(self, option_strings, dest, item: Callable[[str], Any] = str, **kw):
        self.item = item
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest)
        items = [] if current is None or current is self.default else list(current)
        for part in str(values).split(","):
            if part.strip():
                try:
                    items.append(self.item(part.strip()))
                except ValueError:
                    raise argparse.ArgumentError(self, f"invalid value {part.strip()!r}") from None
        setattr(namespace, self.dest, items)


def unquote(text: str) -> str:
    """The GIE v1.5 chart renders some values with literal quotes (`--x="a:b"`): strip one pair."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def quantity(text: str) -> int:
    """The reference's message-size flags: a Kubernetes quantity, a trailing B/b dropped ("10MiB")."""
    t = text.strip()
    if len(t) > 1 and t[-1] in "Bb":
        t = t[:-1]
    return parse_quantity(t, "size")


def duration(text: str) -> float:
    return parse_duration(text)


KINDS: dict[str, Callable[[str], Any]] = {"int": int, "str": str, "duration": duration, "quantity": quantity,
                                          "quoted": unquote}


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag. `kind`: int | bool | str | quoted (str, one pair of quotes
    stripped) | duration | quantity | ints | strs. `ignored`: why a reference flag is accepted
    but not acted on."""

    name: str
    kind: str
    default: Any
    help: str = ""
    ignored: str = ""
    choices: tuple[str, ...] = ()
    short: str = ""

    @property
    def dest(self) -> str:
        return ("ignored_" if self.ignored else "") + self.name.replace("-", "_")


# The five metric-name flags of GIE <= v1.5 -> the engine spec field they rename.
METRIC_FLAGS = {
    "total-queued-requests-metric": "waiting_queue",
    "total-running-requests-metric": "running_requests",
    "kv-cache-usage-percentage-metric": "kv_cache_usage",
    "lora-info-metric": "lora_info",
    "cache-info-metric": "cache_info",
}

_LOGGER = "verbosity of the Go reference's logger; this picker logs by --log-level"
_ZAP = "controller-runtime zap logger setting; this picker logs by --log-level"

FLAGS: tuple[Flag, ...] = (
    # ---- ext_proc serving
    Flag("grpc-port", "int", 9002, "ext_proc gRPC port (and the project API's, see --api-port)"),
    Flag("grpc-health-port", "int", 9003, "gRPC health port"),
    Flag("metrics-port", "int", 9090, "Prometheus metrics port (0 = off)"),
    Flag("bind-address", "str", "0.0.0.0", "address every server listens on"),
    Flag("drain-timeout", "duration", DEFAULT_DRAIN_TIMEOUT,
         "on SIGTERM: report NOT_SERVING and release the leader lease at once, keep serving ext_proc this "
         "long (in-flight and late-routed requests), then stop"),
    Flag("grpc-max-recv-msg-size", "quantity", 0,
         "largest gRPC message received from Envoy, e.g. 10MiB (default: --max-request-body-bytes plus framing)"),
    Flag("grpc-max-send-msg-size", "quantity", 0, "largest gRPC message sent to Envoy, e.g. 10MiB (default: no limit)"),
    Flag("ext-proc-transport", "str", "native",
         "ext_proc server: native (asyncio HTTP/2, about a quarter of grpcio's CPU per request) or "
         "grpcio (grpc.aio); with native the project API is on --api-port", choices=("grpcio", "native")),
    Flag("api-port", "int", -1,
         "project API gRPC port (ListEndpoints, Explain). It has no authentication: expose it only "
         "inside the cluster, never through the gateway. Default: shares --grpc-port with grpcio, "
         "--grpc-port + 10 with native; 0 = off"),
    Flag("max-request-body-bytes", "int", DEFAULT_MAX_REQUEST_BODY_BYTES,
         "largest request body the picker reads, in bytes (default 64 MiB, room for multimodal "
         "bodies); a larger one is answered 413 through Envoy"),
    Flag("secure-serving", "bool", True, "serve gRPC over TLS"),
    Flag("cert-path", "str", "", "directory with tls.crt and tls.key (else self-signed)"),
    Flag("enable-cert-reload", "bool", False, "re-read --cert-path's files when they change (new connections)"),
    Flag("tls-min-version", "str", "", "minimum TLS version of the ext_proc server", choices=("", *TLS_VERSIONS)),
    Flag("tls-cipher-suites", "strs", [], "TLS 1.2 cipher suites, Go crypto/tls names, comma-separated"),
    Flag("health-checking", "bool", False, "also serve gRPC health on the ext_proc port (grpcio transport)"),
    Flag("emit-endpoint-scores", "bool", False,
         "emit the scheduler's per-endpoint scores in the envoy.lb dynamic metadata "
         "(key x-gateway-destination-endpoint-scores)"),
    Flag("enable-grpc-stream-metrics", "bool", False, "ext_proc stream metrics (in flight, hold duration, codes)"),
    # ---- pool / endpoints
    Flag("pool-name", "str", "", "InferencePool to serve (Kubernetes discovery)"),
    Flag("pool-namespace", "str", "", "namespace of the pool (else $NAMESPACE, else default)"),
    Flag("pool-group", "str", "inference.networking.k8s.io", "API group of the InferencePool"),
    Flag("endpoint-selector", "str", "", "standalone mode: pod label selector instead of a pool"),
    Flag("endpoint-target-ports", "ints", [], "standalone mode: comma-separated target ports (1 to 8)"),
    Flag("endpoints", "strs", [], "static endpoints without Kubernetes: ip:port,ip:port"),
    Flag("endpoints-file", "str", "", "YAML file of endpoints, rewrites and objectives (watched)"),
    Flag("ha-enable-leader-election", "bool", False, "Lease-based leader election"),
    Flag("disable-endpoint-subset-filter", "bool", False, "ignore Envoy's subset hint"),
    Flag("kubeconfig", "str", "", "kubeconfig file (default: in-cluster, then ~/.kube/config)"),
    # ---- configuration
    Flag("config-file", "str", "", "EndpointPickerConfig YAML file"),
    Flag("config-text", "str", "", "EndpointPickerConfig YAML text"),
    Flag("allow-experimental-plugins", "bool", False, "allow Alpha plugin types in the config"),
    # ---- model-server metrics
    Flag("refresh-metrics-interval", "duration", MIN_REFRESH_METRICS_INTERVAL,
         "model-server scrape interval (values below 50ms are raised to 50ms)"),
    Flag("metrics-staleness-threshold", "duration", 2.0, "metrics older than this are stale"),
    Flag("model-server-metrics-port", "int", 0, "scrape this port instead of the endpoint's"),
    Flag("model-server-metrics-path", "quoted", "/metrics", "model-server metrics path"),
    Flag("model-server-metrics-scheme", "quoted", "http", "model-server metrics scheme", choices=("http", "https")),
    Flag("model-server-metrics-https-insecure-skip-verify", "bool", True,
         "with https: do not verify the model servers' certificates"),
    *(Flag(name, "quoted", None, "") for name in METRIC_FLAGS),
    # ---- picker metrics
    Flag("metrics-endpoint-auth", "bool", True,
         "Kubernetes modes: /metrics needs a bearer token allowed to get /metrics "
         "(TokenReview + SubjectAccessReview); without Kubernetes it is open"),
    Flag("metrics-cert-dir", "str", "", "directory with tls.crt/tls.key: serve /metrics over TLS"),
    Flag("metrics-client-ca-file", "str", "", "PEM CA: /metrics requires a client certificate it signed"),
    Flag("metrics-max-model-labels", "int", DEFAULT_MAX_MODEL_LABELS,
         "distinct model names the picker's own metrics label, besides the models the pool knows "
         f"(default {DEFAULT_MAX_MODEL_LABELS}); other names are counted under model_name=\"other\""),
    Flag("refresh-prometheus-metrics-interval", "duration", 5.0, "",
         ignored="the pool gauges are computed when /metrics is scraped"),
    Flag("tracing", "bool", True, "OpenTelemetry tracing, exporter from the OTEL_* environment"),
    # ---- logging and diagnostics
    Flag("log-level", "str", "info", "log level of this picker", choices=("debug", "info", "warning", "error")),
    Flag("v", "int", 2, "", ignored=_LOGGER, short="-v"),
    Flag("zap-devel", "bool", True, "", ignored=_ZAP),
    Flag("zap-encoder", "str", "", "", ignored=_ZAP),
    Flag("zap-log-level", "str", "", "", ignored=_ZAP),
    Flag("zap-stacktrace-level", "str", "", "", ignored=_ZAP),
    Flag("zap-time-encoding", "str", "", "", ignored=_ZAP),
    Flag("enable-pprof", "bool", True, "", ignored="Go pprof handlers"),
    # flags of older GIE releases, accepted as before
    Flag("kube-api-qps", "str", "", "", ignored="client-go rate limit of older releases"),
    Flag("kube-api-burst", "str", "", "", ignored="client-go rate limit of older releases"),
    Flag("pool-metrics-ready-pods", "str", "", "", ignored="older releases' metric flag"),
    Flag("lora-active-metric", "str", "", "", ignored="older releases' metric flag"),
)

FLAG_BY_NAME = {f.name: f for f in FLAGS}
IGNORED_REFERENCE_FLAGS = tuple(f.name for f in FLAGS if f.ignored)


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
    ext_proc_transport: str = "native"
    api_port: int = -1  # -1 = the transport's default (grpcio: the ext_proc port; native: + API_PORT_OFFSET), 0 = off
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    metrics_max_model_labels: int = DEFAULT_MAX_MODEL_LABELS
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    grpc_max_recv_msg_size: int = 0  # 0 = the transport's default
    grpc_max_send_msg_size: int = 0  # 0 = no limit
    enable_cert_reload: bool = False
    tls_min_version: str = ""
    tls_cipher_suites: list[str] = field(default_factory=list)
    health_checking: bool = False
    emit_endpoint_scores: bool = False
    enable_grpc_stream_metrics: bool = False
    allow_experimental_plugins: bool = False
    metrics_endpoint_auth: bool = True
    metrics_cert_dir: str = ""
    metrics_client_ca_file: str = ""
    tracing: bool = True
    model_server_metrics_scheme: str = "http"
    model_server_metrics_https_insecure_skip_verify: bool = True
    # engine spec field -> series name, from the v1.5 metric-name flags given (the default engine's)
    engine_metric_flags: dict[str, str] = field(default_factory=dict)


def _add(p: argparse.ArgumentParser, f: Flag) -> None:
    names = [f"--{f.name}", *([f.short] if f.short else [])]
    default = None if f.ignored or f.name in METRIC_FLAGS else f.default  # None: "not given"
    hidden = argparse.SUPPRESS if f.ignored or not f.help else f.help
    kw: dict[str, Any] = {"dest": f.dest, "default": default, "help": hidden}
    if f.choices:
        kw["choices"] = f.choices
    if f.kind == "bool":
        p.add_argument(*names, action=_BoolFlag, **kw)
    elif f.kind in ("ints", "strs"):
        p.add_argument(*names, action=_SliceFlag, item=int if f.kind == "ints" else str, **kw)
    else:
        p.add_argument(*names, type=KINDS[f.kind], **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epp serve", description="Endpoint picker for an InferencePool (ext_proc).")
    for f in FLAGS:
        _add(p, f)
    return p


def _normalise(argv: Sequence[str]) -> list[str]:
    """Go accepts `-flag`; argparse wants `--flag` for long names."""
    out = []
    for arg in argv:
        if re.match(r"^-[a-z][a-z0-9-]+(=.*)?$", arg) and not re.match(r"^-[a-z]\d+$", arg):  # -v4: short -v
            arg = "-" + arg
        out.append(arg)
    return out


def _check(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    if ns.config_file and ns.config_text:
        parser.error("--config-file and --config-text are mutually exclusive")
    sources = [bool(ns.pool_name), bool(ns.endpoint_selector), bool(ns.endpoints or ns.endpoints_file)]
    if sum(sources) > 1:
        parser.error("use exactly one of --pool-name, --endpoint-selector, --endpoints/--endpoints-file")
    if sum(sources) == 0 and not (ns.config_file or ns.config_text):  # a config may name dataLayer.discovery
        parser.error("no endpoint source: give --pool-name, --endpoint-selector, or --endpoints/--endpoints-file")
    if ns.endpoints and ns.endpoints_file:
        parser.error("--endpoints and --endpoints-file are mutually exclusive")
    if ns.max_request_body_bytes <= 0:
        parser.error(f"--max-request-body-bytes: must be positive, got {ns.max_request_body_bytes}")
    if ns.metrics_max_model_labels < 0:
        parser.error(f"--metrics-max-model-labels: must be >= 0, got {ns.metrics_max_model_labels}")
    if not -1 <= ns.api_port <= 65535:
        parser.error(f"--api-port: expected a port (0 = off), got {ns.api_port}")
    if ns.endpoint_selector and not ns.endpoint_target_ports:
        parser.error("--endpoint-selector needs --endpoint-target-ports")
    if len(ns.endpoint_target_ports) > MAX_TARGET_PORTS:
        parser.error(f"--endpoint-target-ports: at most {MAX_TARGET_PORTS} ports, got {len(ns.endpoint_target_ports)}")
    if any(not 0 <= p <= 65535 for p in ns.endpoint_target_ports):
        parser.error(f"--endpoint-target-ports: not a list of ports: {ns.endpoint_target_ports}")
    if ns.metrics_client_ca_file and not ns.metrics_cert_dir:
        parser.error("--metrics-client-ca-file requires --metrics-cert-dir")
    if ns.metrics_cert_dir and not ns.metrics_client_ca_file and not ns.metrics_endpoint_auth:
        parser.error("--metrics-cert-dir serves /metrics over TLS without authentication; "
                     "set --metrics-client-ca-file or --metrics-endpoint-auth")
    if ns.tls_min_version or ns.tls_cipher_suites:
        from epp.tls import TLSSettings

        try:
            TLSSettings(ns.tls_min_version, tuple(ns.tls_cipher_suites))
        except ValueError as e:
            parser.error(str(e))


def parse_args(argv: Sequence[str]) -> Options:
    parser = build_parser()
    ns = parser.parse_args(_normalise(argv))
    _check(parser, ns)
    ns.refresh_metrics_interval = max(ns.refresh_metrics_interval, MIN_REFRESH_METRICS_INTERVAL)
    ports = list(dict.fromkeys(ns.endpoint_target_ports))  # duplicates dropped, as the reference does
    metric_flags = {spec: getattr(ns, name.replace("-", "_")) for name, spec in METRIC_FLAGS.items()}
    computed = {"endpoint_target_ports": ports,
                "ignored": [f.name for f in FLAGS if f.ignored and getattr(ns, f.dest) is not None],
                "endpoints": list(ns.endpoints),
                "tls_cipher_suites": list(ns.tls_cipher_suites),
                "engine_metric_flags": {k: v for k, v in metric_flags.items() if v is not None}}
    # every other field is the flag of the same name
    return Options(**{f.name: computed[f.name] if f.name in computed else getattr(ns, f.name) for f in fields(Options)})


__all__ = ["FLAGS", "FLAG_BY_NAME", "IGNORED_REFERENCE_FLAGS", "METRIC_FLAGS", "Flag", "Options", "UnitError",
           "build_parser", "parse_args", "parse_bool", "parse_duration"]
