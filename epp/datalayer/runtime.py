"""Runs the configured data layer: each source with the extractors bound to it
(`dataLayer.sources[{pluginRef, extractors[{pluginRef}]}]`) becomes a background poller
or an endpoint-event subscription over the datastore.

The pairing is checked when bound, by payload kind (a source's `output_kind`, an
extractor's `input_kind`), so a metrics source with a models extractor is a start-up
error naming both, as in the reference. This module names no plugin type: the kinds are
what sources and extractors declare.

    layer = DataLayer(datastore, base_interval=options.refresh_metrics_interval,
                      scrape_defaults=ScrapeDefaults(specs, path, port, ssl))   # from the flags
    layer.bind(source, [extractor, ...], where="dataLayer.sources[0]")   # ValueError if they do not fit
    layer.on_error(hook)   # hook(kind "poll" | "extract", source type, extractor type)
    await layer.start() ... await layer.stop()

With no metrics source configured the reference injects metrics-data-source ->
core-metrics-extractor with their defaults (unless `dataLayer.injectDefaults: false`);
the config loader does that. What the v1.5 flags (--model-server-metrics-path/-port/
-scheme, the metric-name flags) and the project's `engineMetrics` say applies to a
metrics source left at its default parameters and an extractor without engineConfigs,
as those flags configured the implicit scraper of v1.5; parameters set in the config win.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, Protocol

from epp.datalayer.collector import EndpointPoller, MetricsCollector
from epp.datalayer.datastore import Datastore
from epp.datalayer.kinds import (
    DELETE,
    ENDPOINT_EVENTS,
    K8S_NOTIFICATIONS,
    OPENAI_MODELS,
    PROMETHEUS_TEXT,
    UPSERT,
)
from epp.datalayer.models import ModelsCollector
from epp.datalayer.specs import EngineMetricSpec
from epp.framework import Endpoint

log = logging.getLogger("epp.datalayer")

DEFAULT_POLL_TIMEOUT = 1.0  # seconds per poll (the reference's per-step timeout)


class Source(Protocol):
    name: str
    output_kind: str


class Extractor(Protocol):
    name: str
    input_kind: str


@dataclass(frozen=True, slots=True)
class ScrapeDefaults:
    """How the flags (and the project's engineMetrics) say to scrape, for a metrics source
    and extractor the config leaves at their defaults."""

    specs: Mapping[str, EngineMetricSpec] | None = None  # None: the extractor's own
    path: str = "/metrics"
    port: int = 0  # 0 = the endpoint's port
    ssl: SSLContext | None = None  # https when set


class DataLayer:
    def __init__(self, datastore: Datastore, *, base_interval: float = 0.05, timeout: float = DEFAULT_POLL_TIMEOUT,
                 scrape_defaults: ScrapeDefaults | None = None) -> None:
        self.datastore = datastore
        self.base_interval = base_interval
        self.timeout = timeout
        self.scrape_defaults = scrape_defaults
        self.pollers: list[EndpointPoller] = []
        self._event_extractors: list[Any] = []
        self.notifications: list[Any] = []  # epp.discovery.notifications.NotificationWatch, one per source
        self._known: dict[Endpoint, dict[str, str]] = {}  # endpoint -> labels last told
        self._listening = False
        self._bound: set[str] = set()

    # ------------------------------------------------------------------ wiring (start-up)
    def bind(self, source: Any, extractors: Sequence[Any], where: str = "dataLayer.sources") -> None:
        """Attach one configured source with its extractors; ValueError naming `where`
        when they do not fit together."""
        kind = getattr(source, "output_kind", None)
        if kind is None:
            raise ValueError(f"{where}.pluginRef: plugin {source.name!r} is not a data source")
        if source.name in self._bound:
            raise ValueError(f"{where}.pluginRef: source {source.name!r} is listed twice")
        for i, ex in enumerate(extractors):
            wanted = getattr(ex, "input_kind", None)
            if kind == ENDPOINT_EVENTS:
                if not callable(getattr(ex, "extract_endpoint", None)):
                    raise ValueError(f"{where}.extractors[{i}].pluginRef: {ex.name!r} does not take endpoint "
                                     f"events, which source {source.name!r} delivers")
            elif kind == K8S_NOTIFICATIONS:
                if not callable(getattr(ex, "extract_notification", None)):
                    raise ValueError(f"{where}.extractors[{i}].pluginRef: {ex.name!r} does not take Kubernetes "
                                     f"object events, which source {source.name!r} delivers")
            elif wanted != kind:
                raise ValueError(f"{where}.extractors[{i}].pluginRef: extractor {ex.name!r} reads "
                                 f"{wanted or 'no data source payload'}, but source {source.name!r} yields {kind}")
        if kind in (PROMETHEUS_TEXT, OPENAI_MODELS) and len(extractors) != 1:
            raise ValueError(f"{where}.extractors: source {source.name!r} needs exactly one extractor "
                             f"(got {len(extractors)}): each endpoint has one snapshot of what it publishes")
        self._bound.add(source.name)
        if kind == PROMETHEUS_TEXT:
            ex = extractors[0]
            d = self.scrape_defaults
            source_set = d is None or source.params != type(source.params)()  # parameters given in the config
            extractor_set = d is None or d.specs is None or getattr(ex, "configured", True)
            self.pollers.append(MetricsCollector(
                self.datastore, interval=source.interval(self.base_interval), timeout=self.timeout,
                specs=ex.specs if extractor_set else d.specs,
                port_override=source.port if source_set else d.port,
                path=source.path if source_set else d.path,
                ssl=source.ssl_context if source_set else d.ssl,
                engine_label=ex.engine_label, legacy_engine_label=ex.legacy_engine_label,
                default_engine=ex.default_engine))
        elif kind == OPENAI_MODELS:
            self.pollers.append(ModelsCollector(self.datastore, interval=source.interval(self.base_interval),
                                                timeout=self.timeout, path=source.path, ssl=source.ssl_context))
        elif kind == ENDPOINT_EVENTS:
            self._event_extractors.extend(extractors)
        elif kind == K8S_NOTIFICATIONS:
            if not extractors:
                raise ValueError(f"{where}.extractors: source {source.name!r} has no extractor to tell")
            from epp.discovery.notifications import NotificationWatch

            self.notifications.append(NotificationWatch(source.name, *source.gvk, extractors))
        else:
            raise ValueError(f"{where}.pluginRef: source {source.name!r} yields {kind!r}, which nothing runs")

    def on_error(self, hook: Callable[[str, str, str], None]) -> None:
        """Tell `hook(kind, source type, extractor type)` of every failed poll ("poll") or
        extraction ("extract"), e.g. for llm_d_epp_datalayer_*_errors_total."""
        for poller in self.pollers:
            poller.on_error = (lambda kind, p=poller: hook(kind, p.source_type, p.extractor_type))

    @property
    def metrics(self) -> MetricsCollector | None:
        return next((p for p in self.pollers if isinstance(p, MetricsCollector)), None)

    # ------------------------------------------------------------------ running
    async def start(self) -> None:
        for poller in self.pollers:
            await poller.start()
        if self._event_extractors and not self._listening:
            self._listening = True
            self.datastore.on_endpoints_changed(self._endpoints_changed)
            self._endpoints_changed()

    def check_kubernetes(self, available: bool) -> None:
        """ValueError when a k8s-notification-source is bound but the picker runs without
        Kubernetes (static endpoints, file-discovery): it would watch nothing."""
        if self.notifications and not available:
            names = ", ".join(repr(n.name) for n in self.notifications)
            raise ValueError(f"dataLayer.sources: k8s-notification-source {names} needs Kubernetes discovery "
                             "(--pool-name or --endpoint-selector); with static endpoints it would watch nothing")

    async def start_notifications(self, api: Any, namespace: str) -> None:
        """Start the k8s-notification-sources' watches with Kubernetes discovery's API
        client, in its namespace; ValueError when a watched kind is not served."""
        for watch in self.notifications:
            await watch.start(api, namespace)

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.pollers), *(n.stop() for n in self.notifications))

    def _endpoints_changed(self) -> None:
        """Endpoint events from the datastore's changes: delete for the endpoints gone,
        upsert for the new ones and the ones whose labels changed."""
        current = {ep: dict(ep.labels) for ep in self.datastore.endpoints()}
        known, self._known = self._known, current
        for ep in sorted((e for e in known if e not in current), key=lambda e: e.name):
            self._notify(DELETE, ep)
        for ep, labels in current.items():
            if known.get(ep) != labels:
                self._notify(UPSERT, ep)

    def _notify(self, event: str, ep: Endpoint) -> None:
        for ex in self._event_extractors:
            try:
                ex.extract_endpoint(event, ep)
            except Exception:  # noqa: BLE001 - one extractor's failure must not stop discovery
                log.exception("endpoint-notification extractor %s failed on %s %s", ex.name, event, ep.name)
