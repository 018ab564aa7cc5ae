"""Flow-control queues: one band per priority, one queue per flow (fairness id) in a band,
with per-band (maxRequests, maxBytes) and overall (maxRequests, maxBytes) limits.

The policies are plugins the config names (the reference's pkg/epp/flowcontrol/registry):
each band has a fairness policy (which flow next) and an ordering policy (which request of
a flow next); one usage-limit policy gives each band its saturation ceiling. A dispatch
takes the highest band first and stops at the first band whose ceiling the pool's
saturation has reached (head-of-line blocking, as the reference's dispatch cycle).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from epp.errors import REJECTED_NO_ENDPOINTS, REJECTED_SATURATED, resource_exhausted, service_unavailable
from epp.framework import Endpoint, InferenceRequest

if TYPE_CHECKING:
    from epp.config import FlowControlConfig, PriorityBandConfig


class FairnessPolicy(Protocol):
    def new_state(self) -> Any: ...

    def pick_flow(self, flows: Mapping[str, FlowQueue], state: Any) -> str | None: ...


class OrderingPolicy(Protocol):
    def order_key(self, item: Waiter) -> tuple[Any, ...]: ...


class UsageLimitPolicy(Protocol):
    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]: ...


@dataclass(eq=False, slots=True)
class Waiter:
    """A queued request; `future` is resolved when it is dispatched."""

    seq: int
    request: InferenceRequest
    candidates: Sequence[Endpoint]
    size: int
    enqueued: float
    future: asyncio.Future
    ttl: float = 0.0  # the effective queue TTL (seconds, <= 0 = none), for ordering policies
    ack: asyncio.Future | None = None  # set by the dispatcher; resolved when admit() returns

    @property
    def headers(self) -> Mapping[str, str]:
        return self.request.headers


class FlowQueue:
    """One flow's queued requests, ordered by the band's ordering policy (a heap; the
    enqueue sequence breaks ties so equal keys stay first come first served)."""

    __slots__ = ("heap", "ordering")

    def __init__(self, ordering: OrderingPolicy) -> None:
        self.ordering = ordering
        self.heap: list[tuple[tuple[Any, ...], int, Waiter]] = []

    def __len__(self) -> int:
        return len(self.heap)

    def __iter__(self):
        return (w for _, _, w in self.heap)

    def push(self, waiter: Waiter) -> None:
        heapq.heappush(self.heap, (self.ordering.order_key(waiter), waiter.seq, waiter))

    def head_key(self) -> tuple[Any, ...]:
        key, seq, _ = self.heap[0]
        return (*key, seq)

    def head(self) -> Waiter:
        return self.heap[0][2]

    def pop(self) -> Waiter:
        return heapq.heappop(self.heap)[2]

    def remove(self, waiter: Waiter) -> bool:
        for i, entry in enumerate(self.heap):
            if entry[2] is waiter:
                self.heap[i] = self.heap[-1]
                self.heap.pop()
                heapq.heapify(self.heap)
                return True
        return False

    def newest(self) -> Waiter:
        return max(self.heap, key=lambda e: e[1])[2]


@dataclass(eq=False, slots=True)
class Band:
    config: PriorityBandConfig
    fairness: FairnessPolicy
    ordering: OrderingPolicy
    state: Any = None  # the fairness policy's per-band state
    flows: dict[str, FlowQueue] = field(default_factory=dict)
    count: int = 0
    bytes: int = 0


# observe(seconds queued, priority, outcome): dispatched | rejected_ttl | cancelled
QueueObserver = Callable[[float, int, str], None]


class FlowQueues:
    """The queued requests of every band. The limits come from `config`; a request over
    one is refused before it is queued (429, or 503 when its pool had no endpoint), so the
    queues never exceed them. `policies` resolves the config's policy plugin names."""

    def __init__(self, config: FlowControlConfig, clock: Callable[[], float],
                 policies: Mapping[str, Any]) -> None:
        self.config = config
        self.clock = clock
        self.policies = policies
        self.usage_limit: UsageLimitPolicy = self._policy(config.usage_limit_policy_ref, "compute_limit")
        for band in (*config.priority_bands, config.default_band, config.default_negative_band):
            if band is not None:  # resolve at start-up, so a bad reference fails there
                self._policy(band.fairness_policy_ref, "pick_flow")
                self._policy(band.ordering_policy_ref, "order_key")
        self.bands: dict[int, Band] = {}
        self._order: list[Band] = []  # highest priority first
        self._priorities: list[int] = []
        self._seq = itertools.count()
        self.count = 0
        self.bytes = 0
        self.observe: QueueObserver | None = None
        # the last pop's head-of-line break: (band index, priorities highest first, their ceilings)
        self.blocked: tuple[int, list[int], list[float]] | None = None
        for band in config.priority_bands:  # the configured bands exist from the start (usage limits see them)
            self._band(band.priority)

    def _policy(self, name: str, method: str) -> Any:
        plugin = self.policies.get(name)
        if plugin is None or not callable(getattr(plugin, method, None)):
            raise ValueError(f"flowControl: policy plugin {name!r} is not configured as a {method} policy")
        return plugin

    def band_stats(self) -> dict[int, tuple[int, int]]:
        """priority -> (queued requests, queued bytes)."""
        return {p: (b.count, b.bytes) for p, b in self.bands.items()}

    def _band(self, priority: int) -> Band:
        band = self.bands.get(priority)
        if band is None:
            cfg = self.config.band(priority)
            fairness = self._policy(cfg.fairness_policy_ref, "pick_flow")
            band = self.bands[priority] = Band(cfg, fairness, self._policy(cfg.ordering_policy_ref, "order_key"),
                                               fairness.new_state())
            self._order = sorted(self.bands.values(), key=lambda b: b.config.priority, reverse=True)
            self._priorities = [b.config.priority for b in self._order]
        return band

    def push(self, request: InferenceRequest, candidates: Sequence[Endpoint], ttl: float = 0.0) -> Waiter:
        fc = self.config
        band = self._band(request.priority)
        size = max(0, request.size_bytes)
        cfg = band.config
        full = ""
        if fc.max_bytes and self.bytes + size > fc.max_bytes:
            full = f"flow-control queues are full ({fc.max_bytes} bytes)"
        elif fc.max_requests and self.count >= fc.max_requests:
            full = f"flow-control queues are full ({fc.max_requests} requests)"
        elif cfg.max_bytes and band.bytes + size > cfg.max_bytes:
            full = f"flow-control queue of priority {cfg.priority} is full ({cfg.max_bytes} bytes)"
        elif cfg.max_requests and band.count >= cfg.max_requests:
            full = f"flow-control queue of priority {cfg.priority} is full ({cfg.max_requests} requests)"
        if full:
            if not candidates:  # a waiting room for a pool with no endpoint: unavailability, not backpressure
                raise service_unavailable(f"no endpoints available: {full}", REJECTED_NO_ENDPOINTS)
            raise resource_exhausted(full, REJECTED_SATURATED)
        waiter = Waiter(next(self._seq), request, candidates, size, self.clock(),
                        asyncio.get_running_loop().create_future(), ttl)
        flow = band.flows.get(request.fairness_id)
        if flow is None:
            flow = band.flows[request.fairness_id] = FlowQueue(band.ordering)
        flow.push(waiter)
        band.count += 1
        band.bytes += size
        self.count += 1
        self.bytes += size
        return waiter

    def _account_out(self, band: Band, waiter: Waiter, outcome: str) -> None:
        band.count -= 1
        band.bytes -= waiter.size
        self.count -= 1
        self.bytes -= waiter.size
        obs = self.observe
        if obs is not None:
            obs(self.clock() - waiter.enqueued, waiter.request.priority, outcome)

    def remove(self, waiter: Waiter, outcome: str) -> None:
        """Take a waiter out (TTL expiry, cancellation); no-op if already dispatched."""
        band = self.bands.get(waiter.request.priority)
        if band is None:
            return
        flow = band.flows.get(waiter.request.fairness_id)
        if flow is None or not flow.remove(waiter):
            return  # already dispatched
        if not flow:
            del band.flows[waiter.request.fairness_id]
        self._account_out(band, waiter, outcome)

    def pop(self, saturation: float = 0.0) -> Waiter | None:
        """The next waiter to dispatch at this saturation, or None when every queue is
        empty or the first band with work (or a band above it) is at its usage limit."""
        ceilings = self.usage_limit.compute_limit(saturation, self._priorities)
        self.blocked = None
        for i, (band, ceiling) in enumerate(zip(self._order, ceilings, strict=True)):
            if saturation >= ceiling:
                self.blocked = (i, self._priorities, ceilings)  # for in-flight eviction (epp.flowcontrol.eviction)
                return None  # head-of-line blocking: lower bands wait too
            if not band.count:
                continue
            fid = band.fairness.pick_flow(band.flows, band.state)
            flow = band.flows.get(fid) if fid is not None else None
            if not flow:
                continue
            waiter = flow.pop()
            if not flow:
                del band.flows[fid]
            self._account_out(band, waiter, "dispatched")
            return waiter
        return None

    def admits_now(self, priority: int, saturation: float) -> bool:
        """With nothing queued: whether a dispatch cycle would release a request of this
        priority at once (no band at or above it is at its usage limit)."""
        priorities = sorted({*self._priorities, priority}, reverse=True)
        ceilings = self.usage_limit.compute_limit(saturation, priorities)
        return all(saturation < c for p, c in zip(priorities, ceilings, strict=True) if p >= priority)

    def has_queued(self, priority: int) -> bool:
        band = self.bands.get(priority)
        return band is not None and band.count > 0

    def newest_candidates(self) -> Sequence[Endpoint]:
        """The pool as the most recently queued request of the first busy band saw it."""
        for band in self._order:
            newest = [flow.newest() for flow in band.flows.values() if flow]
            if newest:
                return max(newest, key=lambda w: w.seq).candidates
        return ()

    def drain(self) -> list[Waiter]:
        """Empty every queue (shutdown) and return what was queued."""
        out = [w for band in self._order for flow in band.flows.values() for w in flow]
        for band in self._order:
            band.flows.clear()
            band.count = band.bytes = 0
        self.count = self.bytes = 0
        return out
