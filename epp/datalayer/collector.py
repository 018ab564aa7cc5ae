"""Background scraping of every endpoint's /metrics into Endpoint.metrics.

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
from collections.abc import Mapping

from epp.datalayer.datastore import Datastore
from epp.datalayer.extract import parse_metrics
from epp.datalayer.httpget import HttpGetClient
from epp.datalayer.specs import DEFAULT_ENGINE, DEFAULT_SPECS, EngineMetricSpec
from epp.framework import ENGINE_TYPE_LABEL, Endpoint, Metrics

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


class MetricsCollector:
    def __init__(
        self,
        datastore: Datastore,
        *,
        interval: float = 0.05,
        timeout: float = 1.0,
        specs: Mapping[str, EngineMetricSpec] | None = None,
        port_override: int = 0,
        path: str = "/metrics",
        engine_label: str = ENGINE_TYPE_LABEL,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"scrape interval (--refresh-metrics-interval) must be positive, got {interval}")
        if timeout <= 0:
            raise ValueError(f"scrape timeout must be positive, got {timeout}")
        self.datastore = datastore
        self.interval = interval
        self.timeout = timeout
        self.specs = dict(specs if specs is not None else DEFAULT_SPECS)
        self.port_override = port_override
        self.path = path if path.startswith("/") else "/" + path
        self.engine_label = engine_label
        self._tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self._stats: dict[Endpoint, ScrapeStats] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._listening = False
        self._warned_engines: set[str] = set()

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
                self._tasks[ep] = loop.create_task(self._run(ep), name=f"scrape {ep.name}")

    def _spec(self, ep: Endpoint) -> EngineMetricSpec:
        engine = ep.labels.get(self.engine_label) or DEFAULT_ENGINE
        spec = self.specs.get(engine)
        if spec is None:
            if engine not in self._warned_engines and len(self._warned_engines) < MAX_WARNED_ENGINES:
                self._warned_engines.add(engine)
                log.warning("endpoint %s: unknown engine type %r, scraping it as %s", ep.name, engine,
                            DEFAULT_ENGINE)
            spec = self.specs[DEFAULT_ENGINE]
        return spec

    def _client(self, ep: Endpoint) -> HttpGetClient:
        """One keep-alive connection per endpoint, owned by its scrape task."""
        return HttpGetClient(ep.address, self.port_override or ep.port, timeout=self.timeout,
                             max_body=MAX_PAGE_BYTES, headers=_REQUEST_HEADERS)

    # ------------------------------------------------------------------ scraping
    async def _run(self, ep: Endpoint) -> None:
        stats = self._stats[ep]
        try:
            client = self._client(ep)
        except ValueError as e:  # e.g. a port out of range: never scrapable, so it stays stale
            stats.failed, stats.last_error = 1, f"ValueError: {e}"
            log.error("endpoint %s: cannot scrape it: %s", ep.name, e)
            return
        try:
            # Spread endpoints over the interval so scrapes do not arrive in bursts.
            await asyncio.sleep(random.random() * self.interval)
            next_tick = time.monotonic()
            while True:
                await self._scrape_once(ep, client, stats)
                next_tick += self.interval
                delay = next_tick - time.monotonic()
                if delay < 0:  # fell behind (slow server, busy loop): skip ticks, do not burst
                    next_tick = time.monotonic()
                    delay = 0
                await asyncio.sleep(delay)
        finally:  # cancelled (endpoint gone or stop()): never leave the socket open
            await client.close()

    async def _scrape_once(self, ep: Endpoint, client: HttpGetClient, stats: ScrapeStats) -> None:
        try:
            # The cap is read per scrape so it can be lowered at run time (tests do).
            resp = await client.get(self.path, max_body=MAX_PAGE_BYTES)
            resp.raise_for_status(200)
            problems: list[tuple[str, str]] = []
            metrics = parse_metrics(resp.body, self._spec(ep), time.monotonic(), problems)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure only marks the snapshot stale
            stats.failed += 1
            stats.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if ep.metrics.ok or stats.failed == 1:
                log.warning("scrape of %s (%s) failed: %s", ep.name, client.url(self.path), stats.last_error)
            if ep.metrics.ok:
                self.datastore.set_metrics(ep, dataclasses.replace(ep.metrics, ok=False))
            return
        if not ep.metrics.ok and stats.failed:
            log.info("scrape of %s (%s) recovered", ep.name, client.url(self.path))
        stats.ok += 1
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
