"""Flow-control queues: one band per priority, one FIFO per flow (fairness id) in a
band, with per-band (maxRequests, maxBytes) and overall (maxBytes) limits.

Ordering: highest band first; within a band either the oldest head across flows
(global strict) or the flows in turn (round-robin).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from epp.errors import REJECTED_SATURATED, resource_exhausted
from epp.framework import Endpoint, InferenceRequest

if TYPE_CHECKING:
    from epp.config import FlowControlConfig, PriorityBandConfig


@dataclass(eq=False, slots=True)
class Waiter:
    """A queued request; `future` is resolved when it is dispatched."""

    seq: int
    request: InferenceRequest
    candidates: Sequence[Endpoint]
    size: int
    enqueued: float
    future: asyncio.Future


@dataclass(eq=False, slots=True)
class Band:
    config: PriorityBandConfig
    flows: OrderedDict[str, deque[Waiter]] = field(default_factory=OrderedDict)
    count: int = 0
    bytes: int = 0


# observe(seconds queued, priority, outcome): dispatched | rejected_ttl | cancelled
QueueObserver = Callable[[float, int, str], None]


class FlowQueues:
    """The queued requests of every band. The limits come from `config`; a request over
    one is refused with 429 before it is queued, so the queues never exceed them."""

    def __init__(self, config: FlowControlConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.bands: dict[int, Band] = {}
        self._order: list[Band] = []  # highest priority first
        self._seq = itertools.count()
        self.count = 0
        self.bytes = 0
        self.observe: QueueObserver | None = None

    def band_stats(self) -> dict[int, tuple[int, int]]:
        """priority -> (queued requests, queued bytes)."""
        return {p: (b.count, b.bytes) for p, b in self.bands.items()}

    def _band(self, priority: int) -> Band:
        band = self.bands.get(priority)
        if band is None:
            band = self.bands[priority] = Band(self.config.band(priority))
            self._order = sorted(self.bands.values(), key=lambda b: b.config.priority, reverse=True)
        return band

    def push(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Waiter:
        fc = self.config
        band = self._band(request.priority)
        size = max(0, request.size_bytes)
        cfg = band.config
        if cfg.max_requests and band.count >= cfg.max_requests:
            raise resource_exhausted(f"flow-control queue of priority {cfg.priority} is full "
                                     f"({cfg.max_requests} requests)", REJECTED_SATURATED)
        if cfg.max_bytes and band.bytes + size > cfg.max_bytes:
            raise resource_exhausted(f"flow-control queue of priority {cfg.priority} is full ({cfg.max_bytes} bytes)",
                                     REJECTED_SATURATED)
        if fc.max_bytes and self.bytes + size > fc.max_bytes:
            raise resource_exhausted(f"flow-control queues are full ({fc.max_bytes} bytes)", REJECTED_SATURATED)
        waiter = Waiter(next(self._seq), request, candidates, size, self.clock(),
                        asyncio.get_running_loop().create_future())
        flow = band.flows.get(request.fairness_id)
        if flow is None:
            flow = band.flows[request.fairness_id] = deque()
        flow.append(waiter)
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
        if flow is None:
            return
        try:
            flow.remove(waiter)
        except ValueError:
            return  # already dispatched
        if not flow:
            del band.flows[waiter.request.fairness_id]
        self._account_out(band, waiter, outcome)

    def pop(self) -> Waiter | None:
        """The next waiter to dispatch, or None when all queues are empty."""
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

    def newest_candidates(self) -> Sequence[Endpoint]:
        """The pool as the most recently queued request of the first busy band saw it."""
        for band in self._order:
            for flow in band.flows.values():
                if flow:
                    return flow[-1].candidates
        return ()

    def drain(self) -> list[Waiter]:
        """Empty every queue (shutdown) and return what was queued."""
        out = [w for band in self._order for flow in band.flows.values() for w in flow]
        for band in self._order:
            band.flows.clear()
            band.count = band.bytes = 0
        self.count = self.bytes = 0
        return out
