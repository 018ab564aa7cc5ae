"""Data-layer source plugins of the reference's EndpointPickerConfig (`dataLayer.sources`):
metrics-data-source and models-data-source poll every endpoint over HTTP(S);
endpoint-notification-source hands endpoint add/delete events to its extractors;
k8s-notification-source hands them a Kubernetes kind's object events.

A source only says where and how to fetch (scheme, port, path, TLS, interval) and what
payload it yields (`output_kind`); the extractors bound to it (epp.datalayer.extractors)
say what to make of it, and epp.datalayer.runtime runs the pair.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import ClassVar

from epp.datalayer.kinds import ENDPOINT_EVENTS, K8S_NOTIFICATIONS, OPENAI_MODELS, PROMETHEUS_TEXT
from epp.framework import PluginError, PluginHandle
from epp.tls import client_context
from epp.units import UnitError, parse_duration


@dataclass(slots=True)
class HttpSourceParams:
    """Parameters shared by the HTTP polling sources (names and defaults as the reference's)."""

    scheme: str = "http"
    path: str = "/metrics"
    insecureSkipVerify: bool = True  # noqa: N815 - the reference's parameter names
    caCertPath: str = ""  # noqa: N815
    clientCertPath: str = ""  # noqa: N815
    clientKeyPath: str = ""  # noqa: N815
    interval: str = ""  # Go duration; "" = every --refresh-metrics-interval tick

    def validate(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"scheme: unsupported scheme {self.scheme!r} (http or https)")
        if not self.path.startswith("/") or not self.path.isascii() or not self.path.isprintable() \
                or " " in self.path:
            raise ValueError(f"path: must be an absolute URL path, got {self.path!r}")
        if bool(self.clientCertPath) != bool(self.clientKeyPath):
            raise ValueError("clientCertPath: clientCertPath and clientKeyPath must be set together")
        if self.interval:
            try:
                parse_duration(self.interval)
            except UnitError as e:
                raise ValueError(f"interval: {e}") from None
        client_ssl_context(self)  # certificate files are read at start-up: a bad one names its key

    def interval_seconds(self) -> float:
        return parse_duration(self.interval) if self.interval else 0.0


def client_ssl_context(p: HttpSourceParams) -> ssl.SSLContext | None:
    """The TLS client context for https (None for http): the target's certificate is
    verified against caCertPath (else the system CAs) unless insecureSkipVerify; a client
    certificate is presented for mTLS when clientCertPath/clientKeyPath are set. A file
    that cannot be used raises ValueError starting with the parameter's name."""
    if p.scheme != "https":
        return None
    return client_context(p.caCertPath, p.insecureSkipVerify, p.clientCertPath, p.clientKeyPath)


class HttpPollingSource:
    """Base of the HTTP polling sources: parsed parameters and the TLS context."""

    type_name: ClassVar[str]
    output_kind: ClassVar[str]
    Params: ClassVar[type] = HttpSourceParams

    def __init__(self, name: str, params: HttpSourceParams | None, handle: PluginHandle | None = None) -> None:
        self.name = name
        self.params = params if params is not None else self.Params()
        try:
            self.ssl_context = client_ssl_context(self.params)
        except ValueError as e:
            raise PluginError(f"{name}.parameters.{e}") from None

    @property
    def path(self) -> str:
        return self.params.path

    @property
    def port(self) -> int:
        """0 = the endpoint's own port."""
        return 0

    def interval(self, base: float) -> float:
        """The poll period: the configured interval rounded to the nearest multiple of
        the base tick (--refresh-metrics-interval), at least one tick, as the reference does."""
        wanted = self.params.interval_seconds()
        return base * max(1, round(wanted / base)) if wanted else base


@dataclass(slots=True)
class MetricsSourceParams(HttpSourceParams):
    port: int | None = None  # overrides the endpoint's port for every endpoint of the source

    def validate(self) -> None:
        HttpSourceParams.validate(self)
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port: invalid port {self.port}: must be between 1 and 65535")


class MetricsDataSource(HttpPollingSource):
    """Polls each endpoint's Prometheus page (default http://<endpoint>/metrics)."""

    type_name = "metrics-data-source"
    output_kind = PROMETHEUS_TEXT
    Params = MetricsSourceParams

    @property
    def port(self) -> int:
        return self.params.port or 0


@dataclass(slots=True)
class ModelsSourceParams(HttpSourceParams):
    path: str = "/v1/models"


class ModelsDataSource(HttpPollingSource):
    """Polls each endpoint's OpenAI model list (default http://<endpoint>/v1/models)."""

    type_name = "models-data-source"
    output_kind = OPENAI_MODELS
    Params = ModelsSourceParams


class EndpointNotificationSource:
    """Endpoint lifecycle events (added or updated, deleted) passed to its extractors
    unchanged; an extractor bound to it implements `extract_endpoint(event, endpoint)`
    with event "upsert" or "delete"."""

    type_name = "endpoint-notification-source"
    output_kind = ENDPOINT_EVENTS

    def __init__(self, name: str, params: None = None, handle: PluginHandle | None = None) -> None:
        self.name = name


@dataclass(slots=True)
class K8sNotificationParams:
    group: str = ""  # "" = the core group
    version: str = ""
    kind: str = ""

    def validate(self) -> None:
        if not self.version or not self.kind:
            raise ValueError("kind: version and kind are required for k8s-notification-source")


class K8sNotificationSource:
    """Add/update and delete events of one Kubernetes kind (group, version, kind), watched
    in the pool's namespace, passed to its extractors, which implement
    `extract_notification(event, obj)` ("upsert" | "delete", the object's JSON). Needs
    Kubernetes discovery (--pool-name or --endpoint-selector): with static endpoints it
    would watch nothing, so the picker refuses to start."""

    type_name = "k8s-notification-source"
    output_kind = K8S_NOTIFICATIONS
    Params = K8sNotificationParams

    def __init__(self, name: str, params: K8sNotificationParams | None, handle: PluginHandle | None = None) -> None:
        self.name = name
        self.params = params if params is not None else K8sNotificationParams()
        p = self.params
        if not p.version or not p.kind:
            raise PluginError(f"{name}.parameters: version and kind are required for k8s-notification-source")

    @property
    def gvk(self) -> tuple[str, str, str]:
        return self.params.group, self.params.version, self.params.kind
