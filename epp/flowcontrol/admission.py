"""Admission: legacy shedding, or flow control.

Legacy (default): a sheddable request (priority < 0) is rejected with 429 while the pool
is saturated. Flow control (feature gate `flowControl`): requests wait in the picker's
queues (epp.flowcontrol.queues) and are released one at a time, highest band first, as the
configured policies pick, while the pool's saturation is under the band's usage limit.
Answers as the reference's (pkg/epp/requestcontrol/admission.go, translateFlowControlOutcome):
queue limits 429 rejected-saturated (503 rejected-no-endpoints when the request's pool had
no endpoint); TTL expiry 429 rejected-ttl-expired while the pool has endpoints, 503
rejected-no-endpoints when it has none. The queue-wait budget is defaultRequestTTL while the
pool has endpoints and noEndpointRequestTTL while it has none, each regime change starting a
fresh budget (with a live `pool`; without one, the regime the request was admitted in). A
waiter whose task is cancelled (client went away) leaves its queue at once. With
`reclamation` (flowControl.enableEviction), a head-of-line break may evict sheddable
requests in flight (epp.flowcontrol.eviction).

The controller sees only what it uses: something that reports the pool's saturation
and the flow-control settings (None when the gate is off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from epp.config import FLOW_CONTROL_GATE
from epp.errors import (
    REJECTED_NO_ENDPOINTS,
    REJECTED_SATURATED,
    REJECTED_SHUTTING_DOWN,
    REJECTED_TTL_EXPIRED,
    InferenceError,
    resource_exhausted,
    service_unavailable,
)
from epp.flowcontrol.queues import FlowQueues, QueueObserver, Waiter
from epp.framework import Endpoint, InferenceRequest

log = logging.getLogger("epp.flowcontrol.admission")

if TYPE_CHECKING:
    from epp.config import FlowControlConfig
    from epp.flowcontrol.eviction import ReclamationController


class Saturation(Protocol):
    """What admission asks of the configured saturation detector."""

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        """>= 1.0 means saturated."""
        ...


def gated_flow_control(feature_gates: Collection[str], flow_control: FlowControlConfig | None
                       ) -> FlowControlConfig | None:
    """The flow-control settings when the flowControl gate is on, else None (legacy shedding)."""
    return flow_control if FLOW_CONTROL_GATE in feature_gates else None


class AdmissionController:
    """Gate in front of scheduling. `await admit(request, candidates)` returns a release
    callback to call once when the request is finished (idempotent), or raises
    InferenceError (429 shed / over capacity / queue TTL expired, 503 no endpoints).
    `policies`: the configured plugins by name, where the flow-control policy references
    are resolved. `pool`: the pool's endpoints now (the reference's Locate(nil)), sampled
    by the dispatcher and probed on TTL expiry; without it, the candidates the newest queued
    request saw."""

    def __init__(self, detector: Saturation | None, clock: Callable[[], float] | None = None, *,
                 flow_control: FlowControlConfig | None = None, policies: Mapping[str, object] | None = None,
                 pool: Callable[[], Sequence[Endpoint]] | None = None, poll_interval: float = 0.015,
                 reclamation: ReclamationController | None = None) -> None:
        self.detector = detector
        self.reclamation = reclamation  # in-flight eviction on head-of-line breaks (flowControl.enableEviction)
        self.pool = pool
        # the pool's regime as the dispatcher last saw it (live pool only): empty or not, since when,
        # and a future resolved (and replaced) on each change, which wakes the waiters
        self._regime_empty: bool | None = None
        self._regime_since = -math.inf
        self._regime_changed: asyncio.Future | None = None
        self.clock = clock or time.monotonic
        self.poll_interval = poll_interval
        self.flow_control = flow_control
        self.queues = FlowQueues(flow_control, self.clock, policies or {}) if flow_control is not None else None
        self._dispatcher: asyncio.Task | None = None
        self.in_flight = 0  # admitted and not yet released
        self.last_saturation = 0.0
        # Flow-control metrics hooks (telemetry): observe(request, event, seconds) with event
        # "enqueued" or a final outcome, and the duration of each dispatch cycle.
        self.observe_flow: Callable[[InferenceRequest, str, float], None] | None = None
        self.observe_dispatch_cycle: Callable[[float], None] | None = None

    # ------------------------------------------------------------------ metrics
    @property
    def observe_queue_duration(self) -> QueueObserver | None:
        """observe(seconds, priority, outcome) with outcome dispatched | rejected_ttl | cancelled."""
        return self.queues.observe if self.queues is not None else None

    @observe_queue_duration.setter
    def observe_queue_duration(self, observer: QueueObserver | None) -> None:
        if self.queues is not None:
            self.queues.observe = observer

    @property
    def queue_size(self) -> int:
        return self.queues.count if self.queues is not None else 0

    @property
    def queue_bytes(self) -> int:
        return self.queues.bytes if self.queues is not None else 0

    def band_stats(self) -> dict[int, tuple[int, int]]:
        """priority -> (queued requests, queued bytes)."""
        return self.queues.band_stats() if self.queues is not None else {}

    def _saturation(self, endpoints: Sequence[Endpoint]) -> float:
        detector = self.detector  # None: no detector configured, never saturated
        sat = self.last_saturation = detector.saturation(endpoints) if detector is not None else 0.0
        return sat

    # ------------------------------------------------------------------ admit
    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]) -> Callable[[], None]:
        queues = self.queues
        if queues is None:
            if request.priority < 0 and self._saturation(candidates) >= 1.0:
                raise resource_exhausted("system saturated, sheddable request dropped", REJECTED_SATURATED)
            return self._admitted()
        observe = self.observe_flow
        if queues.count == 0 and queues.admits_now(request.priority, self._saturation(candidates)):
            if observe is not None:
                observe(request, "dispatched", 0.0)
            return self._admitted()
        t0 = time.perf_counter()
        fc = queues.config
        ttl = fc.default_request_ttl if (self._pool_now() if self.pool is not None else candidates) \
            else fc.endpointless_ttl
        try:
            waiter = queues.push(request, candidates, ttl)
        except InferenceError:
            if observe is not None:
                observe(request, "rejected_capacity", time.perf_counter() - t0)
            raise
        if observe is not None:
            observe(request, "enqueued", time.perf_counter() - t0)
        self._ensure_dispatcher()
        try:
            return await self._wait(waiter, candidates, ttl)
        finally:  # the dispatcher waits for this before its next sample: the request is being scheduled now
            ack = waiter.ack
            if ack is not None and not ack.done():
                ack.set_result(None)

    async def _wait(self, waiter: Waiter, candidates: Sequence[Endpoint], ttl: float) -> Callable[[], None]:
        queues = self.queues
        assert queues is not None
        try:
            if self.pool is not None:
                await self._wait_regimes(waiter)
            elif ttl > 0:
                await asyncio.wait_for(asyncio.shield(waiter.future), ttl)
            else:
                await waiter.future
        except TimeoutError:
            if _dispatched(waiter):
                self._observe_final(waiter, "dispatched")
                return self._admitted()  # dispatched in the same instant the timer fired
            queues.remove(waiter, "rejected_ttl")
            self._observe_final(waiter, "rejected_ttl")
            msg = "request timed out in the flow-control queue"
            pool = self._pool_now() if self.pool is not None else (candidates or queues.newest_candidates())
            if not pool:  # the pool has no endpoint: unavailable, not backpressure
                raise service_unavailable(f"{msg} and no endpoints are available", REJECTED_NO_ENDPOINTS) from None
            raise resource_exhausted(msg, REJECTED_TTL_EXPIRED) from None
        except asyncio.CancelledError:
            if not _dispatched(waiter):
                queues.remove(waiter, "cancelled")
            self._observe_final(waiter, "dispatched" if _dispatched(waiter) else "cancelled")
            raise
        self._observe_final(waiter, "dispatched")
        return self._admitted()

    async def _wait_regimes(self, waiter: Waiter) -> None:
        """Wait for dispatch under the budget of the pool's current regime: defaultRequestTTL
        while it has endpoints, noEndpointRequestTTL while it has none, charged from the later
        of enqueue and the last regime change (each change starts a fresh budget), as the
        reference's processor.go isExpired. Raises TimeoutError when the budget is spent."""
        fc = self.queues.config if self.queues is not None else None
        assert fc is not None
        while not waiter.future.done():
            if self._regime_changed is None or self._regime_changed.done():
                self._regime_changed = asyncio.get_running_loop().create_future()
            changed = self._regime_changed
            budget = fc.endpointless_ttl if self._regime_empty else fc.default_request_ttl
            if budget <= 0:
                await asyncio.wait((waiter.future, changed), return_when=asyncio.FIRST_COMPLETED)
                continue
            remaining = max(waiter.enqueued, self._regime_since) + budget - self.clock()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.wait((waiter.future, changed), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        waiter.future.result()  # an exception set on it (shutdown) is raised here

    def _pool_now(self) -> Sequence[Endpoint]:
        if self.pool is None:
            return self.queues.newest_candidates() if self.queues is not None else ()
        pool = self.pool()
        empty = not pool
        if empty != self._regime_empty:
            if self._regime_empty is not None:
                self._regime_since = self.clock()
            self._regime_empty = empty
            changed, self._regime_changed = self._regime_changed, None
            if changed is not None and not changed.done():
                changed.set_result(None)
        return pool

    def _observe_final(self, waiter: Waiter, outcome: str) -> None:
        if self.observe_flow is not None:
            self.observe_flow(waiter.request, outcome, self.clock() - waiter.enqueued)

    def _admitted(self) -> Callable[[], None]:
        self.in_flight += 1
        return release_once(self._release)

    def _release(self) -> None:
        self.in_flight -= 1

    # ------------------------------------------------------------------ dispatcher
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())
            self._dispatcher.add_done_callback(self._dispatcher_done)

    def _dispatcher_done(self, task: asyncio.Task) -> None:
        if self._dispatcher is task:
            self._dispatcher = None

    async def _dispatch_loop(self) -> None:
        """Runs only while something is queued. Each cycle samples the pool's saturation
        and releases one request (the policies' pick) unless a band's usage limit holds it;
        after a release it waits (at most a poll interval) until the released request has
        left admit() and is being scheduled, so its load counts in the next sample; with
        nothing released it waits a poll interval for fresher metrics."""
        queues = self.queues
        assert queues is not None
        while queues.count:
            t0 = time.perf_counter()
            saturation = self._saturation(self._pool_now())
            waiter = queues.pop(saturation)
            if waiter is None and queues.blocked is not None and self.reclamation is not None:
                try:
                    self.reclamation.maybe_reclaim(saturation, *queues.blocked, queues.has_queued)
                except Exception:  # noqa: BLE001 - the dispatcher must outlive a failed eviction decision
                    log.exception("in-flight eviction decision failed")
            ack = None
            if waiter is not None and not waiter.future.done():
                ack = waiter.ack = asyncio.get_running_loop().create_future()
                waiter.future.set_result(None)
            if self.observe_dispatch_cycle is not None:
                self.observe_dispatch_cycle(time.perf_counter() - t0)
            if queues.count:
                if ack is not None:  # until the released request is scheduled (its load counted), bounded
                    await asyncio.wait((ack,), timeout=self.poll_interval)
                else:
                    await asyncio.sleep(self.poll_interval)

    async def close(self) -> None:
        """Stop the dispatcher; queued requests get 503."""
        task = self._dispatcher
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.queues is not None:
            for w in self.queues.drain():
                if not w.future.done():
                    w.future.set_exception(service_unavailable("picker shutting down", REJECTED_SHUTTING_DOWN))


def release_once(release: Callable[[], None]) -> Callable[[], None]:
    """`release` behind a guard: the admission's release callable, safe to call more than once."""
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            release()

    return once


def _dispatched(waiter: Waiter) -> bool:
    return waiter.future.done() and not waiter.future.cancelled()
