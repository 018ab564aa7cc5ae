"""Background polling of every endpoint: /metrics into Endpoint.metrics (and, through
the same poller, other HTTP data sources such as /v1/models).

One task per endpoint, started and cancelled as the datastore's endpoint set changes.
Each task scrapes, publishes an immutable snapshot, and sleeps until its next tick, so
a scrape never overlaps itself. A failed or slow scrape keeps the last snapshot but
marks it not ok (its update_time is kept, so its age grows and staleness checks
see it); nothing here ever raises into scheduling or blocks it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from ssl import SSLContext
from typing import Any

from epp.datalayer.datastore import Datastore
from epp.datalayer.extract import parse_metrics
from epp.datalayer.httpget import HttpGetClient
from epp.datalayer.specs import (
    DEFAULT_ENGINE,
    DEFAULT_SPECS,
    ENGINE_LABEL_KEY,
    LEGACY_ENGINE_LABEL_KEY,
    EngineMetricSpec,
)
from epp.framework import Endpoint, Metrics

log = logging.getLogger("epp.datalayer")

MAX_PAGE_BYTES = 16 << 20  # a /metrics page is tens of KB; anything near this is not one
MAX_WARNED_ENGINES = 64  # unknown engine-type labels remembered so each is logged once


def is_stale(metrics: Metrics, now: float, threshold: float) -> bool:
    """Never scraped, or the last good scrape is older than `threshold` seconds.
    (A failed scrape keeps update_time, so a failing endpoint turns stale by age.)"""
    return metrics.update_time == 0.0 or now - metrics.update_time > threshold


@dataclasses.dataclass(slots=True)
class ScrapeStats:
    """Per-endpoint counters (for logs, tests and the picker's own metrics)."""

    ok: int = 0
    failed: int = 0
    last_error: str = ""
    rejected: int = 0  # scrapes with values out of range (treated as missing)
    rejected_series: set[str] = dataclasses.field(default_factory=set)  # logged once each; bounded by the spec


# Plain text costs the model server no gzip and us no inflate (HttpGetClient always asks for
# identity); it is loopback or in-cluster traffic.
_REQUEST_HEADERS = {"Accept": "text/plain"}


class EndpointPoller:
    """One background task per endpoint GETting `path` every `interval` seconds and
    handing the answer to `_handle` (a data source of the reference's data layer: the
    metrics page, /v1/models). Scheme and TLS come from the source's parameters; an
    `ssl` context means https."""

    what = "poll"  # for log lines
    source_type = ""  # the reference's plugin type names, for the picker's datalayer error counters
    extractor_type = ""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        port_override: int = 0,
        path: str = "/metrics",
        ssl: SSLContext | None = None,
        max_body: int = 0,  # 0 = MAX_PAGE_BYTES, read per poll
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"scrape interval (--refresh-metrics-interval) must be positive, got {interval}")
        if timeout <= 0:
            raise ValueError(f"scrape timeout must be positive, got {timeout}")
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self.port_override = port_override
        self.path = path if path.startswith("/") else "/" + path
        self.ssl = ssl
        self.max_body = max_body
        self.headers = dict(headers or {})
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._stats: dict[Endpoint, ScrapeStats] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._listening = False
        # Told "poll" (fetch failed: connect, timeout, status, size) or "extract" (the answer
        # could not be used) on each failure, e.g. to count llm_d_epp_datalayer_*_errors_total.
        self.on_error: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._running:
            return
        self._loop = asyncio.get_running_loop()
        self._running = True
        if not self._listening:
            self.datastore.on_endpoints_changed(self._reconcile)
            self._listening = True
        self._reconcile()

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each closes its connection

    def stats(self, endpoint: Endpoint) -> ScrapeStats:
        return self._stats.get(endpoint) or ScrapeStats()

    def scraping(self) -> frozenset[Endpoint]:
        return frozenset(self._tasks)

    # ------------------------------------------------------------------ endpoint set
    def _reconcile(self) -> None:
        if not self._running:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # changed from another thread: reconcile on our loop
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._reconcile)
            return
        current = set(self.datastore.endpoints())
        for ep in [e for e in self._tasks if e not in current]:
            self._tasks.pop(ep).cancel()
            self._stats.pop(ep, None)
        for ep in current:
            if ep not in self._tasks:
                self._stats[ep] = ScrapeStats()
                self._tasks[ep] = loop.create_task(self._run(ep), name=f"{self.what} {ep.name}")

    def _client(self, ep: Endpoint) -> HttpGetClient:
        """One keep-alive connection per endpoint, owned by its task."""
        return HttpGetClient(ep.address, self.port_override or ep.port, timeout=self.timeout,
                             max_body=self.max_body or MAX_PAGE_BYTES, headers=self.headers,
                             ssl=self.ssl)

    # ------------------------------------------------------------------ polling
    async def _run(self, ep: Endpoint) -> None:
        stats = self._stats[ep]
        try:
            client = self._client(ep)
        except ValueError as e:  # e.g. a port out of range: never reachable, so it stays stale
            stats.failed, stats.last_error = 1, f"ValueError: {e}"
            log.error("endpoint %s: cannot %s it: %s", ep.name, self.what, e)
            return
        try:
            # Spread endpoints over the interval so polls do not arrive in bursts.
            await asyncio.sleep(random.random() * self.interval)
            next_tick = time.monotonic()
            while True:
                await self._poll_once(ep, client, stats)
                next_tick += self.interval
                delay = next_tick - time.monotonic()
                if delay < 0:  # fell behind (slow server, busy loop): skip ticks, do not burst
                    next_tick = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
        finally:  # cancelled (endpoint gone or stop()): never leave the socket open
            await client.close()

    async def _poll_once(self, ep: Endpoint, client: HttpGetClient, stats: ScrapeStats) -> None:
        was_ok = self._ok(ep)
        kind = "poll"
        try:
            # The cap is read per poll so it can be lowered at run time (tests do).
            resp = await client.get(self.path, max_body=self.max_body or MAX_PAGE_BYTES)
            resp.raise_for_status(200)
            kind = "extract"
            self._handle(ep, resp.body, stats)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure only marks the endpoint's data stale
            self._count_error(kind)
            stats.failed += 1
            stats.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if was_ok or stats.failed == 1:
                log.warning("%s of %s (%s) failed: %s", self.what, ep.name, client.url(self.path), stats.last_error)
            self._failed(ep)
            return
        if not was_ok and stats.failed:
            log.info("%s of %s (%s) recovered", self.what, ep.name, client.url(self.path))
        stats.ok += 1

    def _count_error(self, kind: str) -> None:
        if self.on_error is not None:
            try:
                self.on_error(kind)
            except Exception:  # noqa: BLE001 - a counter must never stop polling
                log.exception("%s error hook failed", self.what)

    def _view(self, ep: Endpoint) -> Any:
        """The endpoint's data from this source: a dataclass with an `ok` flag."""
        raise NotImplementedError

    def _publish(self, ep: Endpoint, view: Any) -> None:
        """Store the endpoint's data from this source in the datastore."""
        raise NotImplementedError

    def _handle(self, ep: Endpoint, body: bytes, stats: ScrapeStats) -> None:
        """Extract and publish; raise to count the poll as failed."""
        raise NotImplementedError

    def _ok(self, ep: Endpoint) -> bool:
        """The endpoint's data from this source is currently good."""
        return self._view(ep).ok

    def _failed(self, ep: Endpoint) -> None:
        """Mark the endpoint's data from this source not ok (keeping it, so its age grows)."""
        view = self._view(ep)
        if view.ok:
            self._publish(ep, dataclasses.replace(view, ok=False))


class MetricsCollector(EndpointPoller):
    """metrics-data-source + core-metrics-extractor: the model server's Prometheus page
    into Endpoint.metrics, by the engine spec its engine-type label selects. `poll` takes
    EndpointPoller's options (interval, timeout, port_override, path, ssl)."""

    what = "scrape"
    source_type = "metrics-data-source"
    extractor_type = "core-metrics-extractor"

    def __init__(
        self,
        datastore: Datastore,
        *,
        specs: Mapping[str, EngineMetricSpec] | None = None,
        engine_label: str = ENGINE_LABEL_KEY,
        legacy_engine_label: str = LEGACY_ENGINE_LABEL_KEY,
        default_engine: str = DEFAULT_ENGINE,
        **poll: Any,
    ) -> None:
        super().__init__(datastore, headers=_REQUEST_HEADERS, **poll)
        self.specs = dict(specs if specs is not None else DEFAULT_SPECS)
        if default_engine not in self.specs:
            raise ValueError(f"defaultEngine {default_engine!r} not found in engineConfigs")
        self.engine_label = engine_label
        self.legacy_engine_label = legacy_engine_label  # read when the endpoint lacks engine_label
        self.default_engine = default_engine
        self._warned_engines: set[str] = set()

    def _spec(self, ep: Endpoint) -> EngineMetricSpec:
        labels = ep.labels
        engine = labels.get(self.engine_label) or (labels.get(self.legacy_engine_label)
                                                   if self.legacy_engine_label else "") or self.default_engine
        spec = self.specs.get(engine)
        if spec is None:
            if engine not in self._warned_engines and len(self._warned_engines) < MAX_WARNED_ENGINES:
                self._warned_engines.add(engine)
                log.warning("endpoint %s: unknown engine type %r, scraping it as %s", ep.name, engine,
                            self.default_engine)
            spec = self.specs[self.default_engine]
        return spec

    def _view(self, ep: Endpoint) -> Metrics:
        return ep.metrics

    def _publish(self, ep: Endpoint, view: Metrics) -> None:
        self.datastore.set_metrics(ep, view)

    def _handle(self, ep: Endpoint, body: bytes, stats: ScrapeStats) -> None:
        problems: list[tuple[str, str]] = []
        metrics = parse_metrics(body, self._spec(ep), time.monotonic(), problems)
        if problems:
            self._report(ep, stats, problems)
        self.datastore.set_metrics(ep, metrics)

    def _report(self, ep: Endpoint, stats: ScrapeStats, problems: list[tuple[str, str]]) -> None:
        """Log a rejected series once per endpoint, not once per scrape."""
        stats.rejected += 1
        for series, problem in problems:
            if series not in stats.rejected_series:
                stats.rejected_series.add(series)
                log.warning("endpoint %s: %s: %s", ep.name, series, problem)
