"""active-request-scorer (the reference's scheduling/scorer/activerequest/active_request.go):
scores on the requests in flight per endpoint, read from an in-flight load producer
(inFlightLoadProducerName; the config loader adds the default one when none is configured).

c <= idleThreshold: 1.0; else (maxCount - c) / maxCount * maxBusyScore, where maxCount is
the largest count among the candidates. As the reference: a negative idleThreshold means 0,
a maxBusyScore outside [0, 1] means 1.0 (each with a warning), and the deprecated
requestTimeout is ignored with a log (the producer releases a request when it completes)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import INFLIGHT_LOAD, INFLIGHT_LOAD_CONSUMER, INFLIGHT_LOAD_PRODUCER
from epp.framework.plugins import ConfiguredPlugin

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ActiveRequestParams:
    idleThreshold: int = 0
    maxBusyScore: float | None = None
    requestTimeout: str | float | None = None  # deprecated, ignored
    inFlightLoadProducerName: str = INFLIGHT_LOAD_PRODUCER


class ActiveRequestScorer(ConfiguredPlugin[ActiveRequestParams]):
    type_name = "active-request-scorer"
    Params = ActiveRequestParams
    consumes = (INFLIGHT_LOAD_CONSUMER,)

    def configure(self, p: ActiveRequestParams, handle: PluginHandle) -> None:
        if p.requestTimeout not in (None, ""):
            log.info("%s: requestTimeout is deprecated and ignored (the in-flight load producer releases a "
                     "request when it completes)", self.name)
        if p.idleThreshold < 0:
            log.warning("%s: idleThreshold %d is negative, 0 is used", self.name, p.idleThreshold)
        self.idle = max(0, p.idleThreshold)
        busy = 1.0 if p.maxBusyScore is None else p.maxBusyScore
        if not 0.0 <= busy <= 1.0:
            log.warning("%s: maxBusyScore %s is outside [0, 1], 1.0 is used", self.name, busy)
            busy = 1.0
        self.max_busy = busy
        self._key = self.producer_key(INFLIGHT_LOAD, INFLIGHT_LOAD_CONSUMER)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        load = cycle.read(self._key)
        get = load.requests.get if load is not None else {}.get
        counts = [get(e, 0) for e in endpoints]
        max_count = max(counts, default=0)
        idle, busy = self.idle, self.max_busy
        return [1.0 if c <= idle else (max_count - c) / max_count * busy for c in counts]
