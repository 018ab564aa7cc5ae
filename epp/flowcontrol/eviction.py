"""In-flight eviction: when a higher-priority request is held back by a saturated pool,
end sheddable requests that are already running on a model server to make room.

As the reference's (llm-d-router pkg/epp/flowcontrol/eviction, controller/internal/
reclamation.go, turned on by `flowControl.enableEviction: true` with the flowControl
feature gate):
- every routed request is tracked while in flight; the victim filter
  (`sheddable-eviction-filter`: priority < 0) decides which are evictable and the victim
  ordering (`priority-then-time-eviction-order-policy`: lowest priority first, then the
  most recently dispatched) which goes first. Both are wired in, as the reference's runner
  does; they are also registered (Alpha) plugin types without parameters
  (epp.flowcontrol.eviction_policies).
- on a head-of-line break the dispatcher asks the ReclamationController: when its gate is
  open (nothing issued is unconfirmed or cooling) and a blocked band with queued requests
  has a priority strictly above the next victim's and a positive ceiling the saturation
  reached, it evicts n = max(1, ceil((saturation - ceiling - pending) / (saturation /
  in_flight))) requests, at most MAX_REVOCATIONS_PER_DECISION and never one whose
  priority is not below that band's.
- an evicted request's ext_proc stream answers Envoy with ImmediateResponse 429, body
  "request evicted by flow control", header x-llm-d-request-dropped-reason: evicted
  (handlers/server.go); Envoy then resets the upstream request. The revocation is
  confirmed when the stream ends (or after CONFIRMATION_TIMEOUT) and its debit cools for
  the confirmation grace: 10 ms with the concurrency-detector (its counts drop with the
  stream), else refresh-metrics-interval + metrics-staleness-threshold + 250 ms.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from epp.errors import EVICTED
from epp.framework.registry import plugin_class

log = logging.getLogger("epp.flowcontrol.eviction")

MAX_REVOCATIONS_PER_DECISION = 2  # the reference's defaultMaxRevocationsPerDecision
CONFIRMATION_TIMEOUT = 10.0  # seconds: an unconfirmed revocation stops holding the gate (defaultEvictionConfirmationTimeout)
ENGINE_RECLAIM_BUDGET = 0.25  # seconds: engine abort and KV release before a scrape can see it
LEADING_SENSOR_GRACE = 0.01  # seconds: a detector whose gauge drops with the stream (concurrency-detector)
LEADING_SENSORS = frozenset({"concurrency-detector"})
EVICTION_BODY = b"request evicted by flow control"
VICTIM_FILTER = "sheddable-eviction-filter"  # the plugin types the reference wires in (not configurable)
VICTIM_ORDERING = "priority-then-time-eviction-order-policy"
CONFIRMATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(slots=True, eq=False)
class EvictionItem:
    """A request routed to a model server and still in flight."""

    request_id: str
    priority: int
    dispatch_time: float  # monotonic seconds
    target: str  # host:port of the primary endpoint
    signal: Callable[[str], None] = field(repr=False)  # tells the request's stream to end, with the reason


class EvictionFilter(Protocol):
    def accept(self, item: EvictionItem) -> bool: ...


class EvictionOrdering(Protocol):
    def less(self, a: EvictionItem, b: EvictionItem) -> bool: ...


class EvictionMetrics:
    """The reference's revocation families (llm_d_router_metrics.go), registered always as there."""

    def __init__(self, registry: CollectorRegistry | None, pool: str) -> None:
        self.pool = pool
        kw: dict[str, Any] = {"registry": registry}
        self.issued = Counter("llm_d_epp_flow_control_revocations_issued", "Total number of in-flight eviction "
                              "revocations issued, labeled by the demand band's priority.",
                              ("priority", "inference_pool"), **kw)
        self.outcomes = Counter("llm_d_epp_flow_control_revocations", "Total number of in-flight eviction "
                                "revocations by terminal outcome (confirmed, timed_out). Every issued revocation "
                                "eventually increments exactly one outcome.", ("outcome", "inference_pool"), **kw)
        self.reclaim_target = Gauge("llm_d_epp_flow_control_reclaim_target", "Last computed reclamation deficit, "
                                    "in saturation-gauge units.", ("inference_pool",), **kw)
        self.pending_reclaim = Gauge("llm_d_epp_flow_control_pending_reclaim", "Sum of outstanding and cooling "
                                     "pending-reclaim debits, in saturation-gauge units.", ("inference_pool",), **kw)
        self.confirmation = Histogram("llm_d_epp_flow_control_revocation_confirmation_seconds", "Time from "
                                      "revocation issue to confirmed stream termination.", ("inference_pool",),
                                      buckets=CONFIRMATION_BUCKETS, **kw)


class RequestEvictor:
    """Tracks the requests in flight and ends the chosen ones. `track` when a request is
    routed, `untrack` when its stream ends (idempotent); `on_terminated(request_id)` is
    told once per evicted request when its stream ends. Bounded by the requests in flight:
    each entry leaves at its stream's end. Victim selection scans the evictable requests
    (no heap): it runs only on a head-of-line break with the pacing gate open."""

    def __init__(self, ordering: EvictionOrdering, filter: EvictionFilter) -> None:  # noqa: A002 - the reference's name
        self.ordering = ordering
        self.filter = filter
        self.in_flight: dict[str, EvictionItem] = {}
        self.evictable: dict[str, EvictionItem] = {}
        self.pending: set[str] = set()  # evicted, stream not ended yet
        self.on_terminated: Callable[[str], None] | None = None
        self._key = functools.cmp_to_key(lambda a, b: -1 if ordering.less(a, b) else 1 if ordering.less(b, a) else 0)

    def track(self, item: EvictionItem) -> bool:
        """Track a routed request; whether the filter made it evictable."""
        self.in_flight[item.request_id] = item
        if self.filter.accept(item):
            self.evictable[item.request_id] = item
            return True
        self.evictable.pop(item.request_id, None)
        return False

    def untrack(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)
        self.evictable.pop(request_id, None)
        if request_id in self.pending:
            self.pending.discard(request_id)
            if self.on_terminated is not None:
                self.on_terminated(request_id)

    def stats(self) -> tuple[int, int]:
        """(requests in flight, evictable ones)."""
        return len(self.in_flight), len(self.evictable)

    def _victim(self) -> EvictionItem | None:
        return min(self.evictable.values(), key=self._key) if self.evictable else None

    def victim_priority(self) -> int | None:
        """The next victim's priority; None when nothing is evictable."""
        victim = self._victim()
        return victim.priority if victim is not None else None

    def evict_n(self, n: int, priority_bound: int) -> list[str]:
        """Evict up to n requests in victim order, stopping at the first whose priority is
        not strictly below `priority_bound`. Each stream is told on the next loop turn,
        after the caller has registered the revocations."""
        evicted = []
        loop = asyncio.get_running_loop()
        for _ in range(n):
            victim = self._victim()
            if victim is None or victim.priority >= priority_bound:
                break
            rid = victim.request_id
            del self.evictable[rid]
            del self.in_flight[rid]
            self.pending.add(rid)
            loop.call_soon(victim.signal, EVICTED)
            log.info("evicting an in-flight request of priority %d on %s", victim.priority, victim.target)
            evicted.append(rid)
        return evicted


@dataclass(slots=True)
class _Revocation:
    credit: float
    issued_at: float


@dataclass(eq=False)
class ReclamationController:
    """Decides when eviction fires and how many requests it ends (reclamation.go):
    stop-and-wait pacing, sizing from the saturation deficit over the mean footprint of a
    request in flight."""

    evictor: RequestEvictor
    metrics: EvictionMetrics | None
    _: KW_ONLY
    grace: float
    max_revocations: int = MAX_REVOCATIONS_PER_DECISION
    timeout: float = CONFIRMATION_TIMEOUT
    clock: Callable[[], float] = time.monotonic
    outstanding: dict[str, _Revocation] = field(default_factory=dict, init=False)
    cooling: list[tuple[float, float]] = field(default_factory=list, init=False)  # (credit, expires at)
    pending_reclaim: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.evictor.on_terminated = self.confirm

    def gate_open(self, now: float) -> bool:
        """Open only when every issued revocation is confirmed and its grace has passed."""
        for rid, r in list(self.outstanding.items()):
            if now - r.issued_at >= self.timeout:
                del self.outstanding[rid]
                self.cooling.append((r.credit, now + self.grace))
                self._count("timed_out")
                log.info("revocation of request_id=%s not confirmed within %ss; treated as confirmed", rid,
                         self.timeout)
        if self.cooling:
            kept = [(c, t) for c, t in self.cooling if now < t]
            if len(kept) != len(self.cooling):
                self.pending_reclaim = max(0.0, self.pending_reclaim - sum(c for c, t in self.cooling if now >= t))
                self.cooling = kept
                self._set_pending()
        return not self.outstanding and not self.cooling

    def maybe_reclaim(self, saturation: float, start: int, priorities: Sequence[int], ceilings: Sequence[float],
                      has_queued: Callable[[int], bool]) -> None:
        """A head-of-line break at band index `start` (priorities highest first): evict for
        the first blocked band with queued requests above the next victim's priority."""
        if not self.gate_open(self.clock()):
            return
        victim = self.evictor.victim_priority()
        if victim is None:
            return
        for priority, ceiling in zip(priorities[start:], ceilings[start:], strict=True):
            if priority <= victim:
                return
            # a zero ceiling never dispatches, whatever is reclaimed; an unblocked band dispatches next cycle
            if ceiling <= 0 or saturation < ceiling or not has_queued(priority):
                continue
            self.reclaim(saturation, ceiling, priority)
            return

    def reclaim(self, saturation: float, ceiling: float, demand_priority: int) -> None:
        in_flight, evictable = self.evictor.stats()
        if in_flight <= 0 or evictable <= 0:
            return
        credit = saturation / in_flight
        if not credit > 0 or math.isinf(credit):
            return
        target = saturation - ceiling
        net = target - self.pending_reclaim
        if self.metrics is not None:
            self.metrics.reclaim_target.labels(self.metrics.pool).set(target)
        if net < 0 or (net == 0 and self.pending_reclaim > 0):
            return
        # unblocking needs strictly more than the deficit: at net == 0 still evict one
        n = min(max(1, math.ceil(net / credit)), self.max_revocations, evictable)
        evicted = self.evictor.evict_n(n, demand_priority)
        now = self.clock()
        for rid in evicted:
            self.outstanding[rid] = _Revocation(credit, now)
            self.pending_reclaim += credit
        if self.metrics is not None:
            self.metrics.issued.labels(str(demand_priority), self.metrics.pool).inc(len(evicted))
        self._set_pending()

    def confirm(self, request_id: str) -> None:
        """An evicted request's stream ended."""
        r = self.outstanding.pop(request_id, None)
        if r is None:
            return
        now = self.clock()
        self.cooling.append((r.credit, now + self.grace))
        self._count("confirmed")
        if self.metrics is not None:
            self.metrics.confirmation.labels(self.metrics.pool).observe(now - r.issued_at)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outcomes.labels(outcome, self.metrics.pool).inc()

    def _set_pending(self) -> None:
        if self.metrics is not None:
            self.metrics.pending_reclaim.labels(self.metrics.pool).set(self.pending_reclaim)


def confirmation_grace(detector_type: str, refresh_interval: float, staleness: float) -> float:
    """How long a confirmed revocation keeps its debit: until the freed capacity shows in
    the detector's gauge (the reference's deriveEvictionConfirmationGrace)."""
    if detector_type in LEADING_SENSORS:
        return LEADING_SENSOR_GRACE
    return refresh_interval + staleness + ENGINE_RECLAIM_BUDGET


def build_eviction(detector: object, refresh_interval: float, staleness: float,
                   metrics: EvictionMetrics | None) -> tuple[RequestEvictor, ReclamationController]:
    """The eviction plumbing as the reference's runner wires it (buildRequestEvictor)."""
    evictor = RequestEvictor(plugin_class(VICTIM_ORDERING)(VICTIM_ORDERING), plugin_class(VICTIM_FILTER)(VICTIM_FILTER))
    grace = confirmation_grace(getattr(detector, "type_name", ""), refresh_interval, staleness)
    log.info("in-flight eviction on: filter %s, ordering %s, confirmation grace %.3fs", VICTIM_FILTER,
             VICTIM_ORDERING, grace)
    return evictor, ReclamationController(evictor, metrics, grace=grace)


__all__ = ["EvictionItem", "RequestEvictor",
           "ReclamationController", "EvictionMetrics", "confirmation_grace", "build_eviction", "EVICTION_BODY",
           "MAX_REVOCATIONS_PER_DECISION", "CONFIRMATION_TIMEOUT"]
