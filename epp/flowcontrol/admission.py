"""Admission: saturation detection, legacy shedding, and flow control.

Legacy (default): a sheddable request (priority < 0) is rejected with 429 while the pool
is saturated. Flow control (feature gate `flowControl`): requests wait in the picker,
one queue per flow (fairness id, priority), and are released highest band first while
saturation < 1.0; FCFS within a band across flows (global strict) or round-robin across
flows. Limits per band (maxBytes, maxRequests) and overall (maxBytes): 429. TTL expiry:
503. A waiter whose task is cancelled (client went away) leaves its queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epp.errors import resource_exhausted, service_unavailable
from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.registry import register

if TYPE_CHECKING:
    from epp.config import FlowControlConfig, PriorityBandConfig
    from epp.requestcontrol.pipeline import PickerPipeline


# --------------------------------------------------------------------------- saturation
def _duration_param(value: str | float, key: str) -> float:
    from epp.config import ConfigError, parse_duration

    try:
        return parse_duration(value, key)
    except ConfigError as e:
        raise ValueError(str(e)) from None


@dataclass(slots=True)
class UtilizationParams:
    queueDepthThreshold: int = 5
    kvCacheUtilThreshold: float = 0.8
    metricsStalenessThreshold: str | float = "200ms"
    headroom: float = 0.0  # the filter lets endpoints exceed the thresholds by this fraction

    def validate(self) -> None:
        if self.queueDepthThreshold <= 0:
            raise ValueError(f"queueDepthThreshold: must be > 0, got {self.queueDepthThreshold}")
        if not 0.0 < self.kvCacheUtilThreshold <= 1.0:
            raise ValueError(f"kvCacheUtilThreshold: must be in (0, 1], got {self.kvCacheUtilThreshold}")
        if self.headroom < 0:
            raise ValueError(f"headroom: must be >= 0, got {self.headroom}")
        _duration_param(self.metricsStalenessThreshold, "metricsStalenessThreshold")


@register
class UtilizationDetector:
    """Filter: keep endpoints under both thresholds (times 1+headroom), unless none pass.
    Saturation: mean over endpoints of max(queue/queueDepthThreshold, kv/kvCacheUtilThreshold);
    an endpoint whose metrics are stale or missing counts as 1.0. No endpoints: 1.0."""

    type_name = "utilization-detector"
    Params = UtilizationParams

    def __init__(self, name: str, params: UtilizationParams | None, handle: PluginHandle) -> None:
        p = params or UtilizationParams()
        self.name = name
        self.queue_threshold = p.queueDepthThreshold
        self.kv_threshold = p.kvCacheUtilThreshold
        self.staleness = _duration_param(p.metricsStalenessThreshold, "metricsStalenessThreshold")
        self.headroom = p.headroom
        self.clock = handle.clock

    def _fresh(self, e: Endpoint, now: float) -> bool:
        t = e.metrics.update_time
        return bool(t) and now - t <= self.staleness

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        now = self.clock()
        q_max = self.queue_threshold * (1.0 + self.headroom)
        kv_max = self.kv_threshold * (1.0 + self.headroom)
        kept = [e for e in endpoints if self._fresh(e, now)
                and e.metrics.waiting_queue_size < q_max and e.metrics.kv_cache_usage_percent < kv_max]
        return kept if kept else endpoints

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        now = self.clock()
        q, kv = self.queue_threshold, self.kv_threshold
        total = 0.0
        for e in endpoints:
            if not self._fresh(e, now):
                total += 1.0
                continue
            m = e.metrics
            total += max(m.waiting_queue_size / q, m.kv_cache_usage_percent / kv)
        return total / len(endpoints)


# --------------------------------------------------------------------------- admission
def _noop() -> None:
    return None


@dataclass(eq=False, slots=True)
class _Waiter:
    seq: int
    request: InferenceRequest
    candidates: Sequence[Endpoint]
    size: int
    enqueued: float
    future: asyncio.Future


@dataclass(eq=False, slots=True)
class _Band:
    config: PriorityBandConfig
    flows: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)
    count: int = 0
    bytes: int = 0


class AdmissionController:
    """Gate in front of scheduling. `await admit(request, candidates)` returns a release
    callback to call once when the request is finished (idempotent), or raises
    InferenceError (429 shed / over capacity, 503 queue TTL expired)."""

    def __init__(self, pipeline: PickerPipeline, clock: Callable[[], float] | None = None, *,
                 poll_interval: float = 0.015) -> None:
        import time

        from epp.config import FLOW_CONTROL_GATE

        self.pipeline = pipeline
        self.clock = clock or time.monotonic
        self.poll_interval = poll_interval
        fc = pipeline.flow_control
        self.flow_control: FlowControlConfig | None = fc if FLOW_CONTROL_GATE in pipeline.feature_gates else None
        self._bands: dict[int, _Band] = {}
        self._order: list[_Band] = []  # highest priority first
        self._seq = itertools.count()
        self._count = 0
        self._bytes = 0
        self._dispatcher: asyncio.Task | None = None
        self.in_flight = 0  # admitted and not yet released
        self.last_saturation = 0.0
        # optional: observe_queue_duration(seconds, priority, outcome) with outcome
        # dispatched | rejected_ttl | cancelled
        self.observe_queue_duration: Callable[[float, int, str], None] | None = None

    # ------------------------------------------------------------------ metrics
    @property
    def queue_size(self) -> int:
        return self._count

    @property
    def queue_bytes(self) -> int:
        return self._bytes

    def band_stats(self) -> dict[int, tuple[int, int]]:
        """priority -> (queued requests, queued bytes)."""
        return {p: (b.count, b.bytes) for p, b in self._bands.items()}

    # ------------------------------------------------------------------ admit
    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Callable[[], None]:
        fc = self.flow_control
        if fc is None:
            if request.priority < 0:
                sat = self.last_saturation = self.pipeline.saturation(candidates)
                if sat >= 1.0:
                    raise resource_exhausted("system saturated, sheddable request dropped")
            return self._admitted()
        if self._count == 0:
            sat = self.last_saturation = self.pipeline.saturation(candidates)
            if sat < 1.0:
                return self._admitted()
        waiter = self._enqueue(fc, request, candidates)
        self._ensure_dispatcher()
        ttl = fc.default_request_ttl
        try:
            if ttl > 0:
                await asyncio.wait_for(asyncio.shield(waiter.future), ttl)
            else:
                await waiter.future
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():
                return self._admitted()  # dispatched in the same instant the timer fired
            self._remove(waiter, "rejected_ttl")
            raise service_unavailable(f"request expired in the flow-control queue after {ttl:g}s") from None
        except asyncio.CancelledError:
            if not (waiter.future.done() and not waiter.future.cancelled()):
                self._remove(waiter, "cancelled")
            raise
        return self._admitted()

    def _admitted(self) -> Callable[[], None]:
        self.in_flight += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_flight -= 1

        return release

    # ------------------------------------------------------------------ queues
    def _band(self, fc: FlowControlConfig, priority: int) -> _Band:
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = _Band(fc.band(priority))
            self._order = sorted(self._bands.values(), key=lambda b: b.config.priority, reverse=True)
        return band

    def _enqueue(self, fc: FlowControlConfig, request: InferenceRequest, candidates: Sequence[Endpoint]) -> _Waiter:
        band = self._band(fc, request.priority)
        size = max(0, request.size_bytes)
        cfg = band.config
        if cfg.max_requests and band.count >= cfg.max_requests:
            raise resource_exhausted(f"flow-control queue of priority {cfg.priority} is full "
                                     f"({cfg.max_requests} requests)")
        if cfg.max_bytes and band.bytes + size > cfg.max_bytes:
            raise resource_exhausted(f"flow-control queue of priority {cfg.priority} is full ({cfg.max_bytes} bytes)")
        if fc.max_bytes and self._bytes + size > fc.max_bytes:
            raise resource_exhausted(f"flow-control queues are full ({fc.max_bytes} bytes)")
        waiter = _Waiter(next(self._seq), request, candidates, size, self.clock(),
                         asyncio.get_running_loop().create_future())
        flow = band.flows.get(request.fairness_id)
        if flow is None:
            flow = band.flows[request.fairness_id] = deque()
        flow.append(waiter)
        band.count += 1
        band.bytes += size
        self._count += 1
        self._bytes += size
        return waiter

    def _account_out(self, band: _Band, waiter: _Waiter, outcome: str) -> None:
        band.count -= 1
        band.bytes -= waiter.size
        self._count -= 1
        self._bytes -= waiter.size
        obs = self.observe_queue_duration
        if obs is not None:
            obs(self.clock() - waiter.enqueued, waiter.request.priority, outcome)

    def _remove(self, waiter: _Waiter, outcome: str) -> None:
        band = self._bands.get(waiter.request.priority)
        if band is None:
            return
        flow = band.flows.get(waiter.request.fairness_id)
        if flow is None:
            return
        try:
            flow.remove(waiter)
        except ValueError:
            return  # already dispatched
        if not flow:
            del band.flows[waiter.request.fairness_id]
        self._account_out(band, waiter, outcome)

    def _pop_next(self) -> _Waiter | None:
        for band in self._order:
            if not band.count:
                continue
            if band.config.fairness_policy == "round-robin":
                fid, flow = next(iter(band.flows.items()))
                band.flows.move_to_end(fid)
            else:  # global strict: oldest head across flows
                fid, flow = min(band.flows.items(), key=lambda kv: kv[1][0].seq)
            waiter = flow.popleft()
            if not flow:
                del band.flows[fid]
            self._account_out(band, waiter, "dispatched")
            return waiter
        return None

    # ------------------------------------------------------------------ dispatcher
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())
            self._dispatcher.add_done_callback(self._dispatcher_done)

    def _dispatcher_done(self, task: asyncio.Task) -> None:
        if self._dispatcher is task:
            self._dispatcher = None

    def _head_candidates(self) -> Sequence[Endpoint]:
        for band in self._order:
            for flow in band.flows.values():
                if flow:
                    return flow[-1].candidates  # the newest view of the pool
        return ()

    async def _dispatch_loop(self) -> None:
        """Runs only while something is queued: release requests highest band first while
        the pool is not saturated, then wait a poll interval for fresher metrics."""
        while self._count:
            sat = self.last_saturation = self.pipeline.saturation(self._head_candidates())
            while self._count and sat < 1.0:
                waiter = self._pop_next()
                if waiter is None:
                    break
                if not waiter.future.done():
                    waiter.future.set_result(None)
            if self._count:
                await asyncio.sleep(self.poll_interval)

    async def close(self) -> None:
        """Stop the dispatcher; queued requests get 503."""
        task = self._dispatcher
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for band in self._order:
            for flow in list(band.flows.values()):
                for w in list(flow):
                    if not w.future.done():
                        w.future.set_exception(service_unavailable("picker shutting down"))
            band.flows.clear()
            band.count = band.bytes = 0
        self._count = self._bytes = 0
