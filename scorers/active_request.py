"""active-request-scorer: counts requests in flight per endpoint itself (PreRequest adds,
ResponseComplete removes; entries older than requestTimeout expire, checked on each
PreRequest, so a lost completion cannot pin an endpoint as busy forever)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ResponseInfo,
    SchedulingResult,
    bounded,
)
from epp.units import duration_value


@dataclass(slots=True)
class ActiveRequestParams:
    idleThreshold: int = bounded(0, ge=0)
    maxBusyScore: float = bounded(1.0, ge=0, le=1)
    requestTimeout: str | float = "2m"

    def validate(self) -> None:
        duration_value(self.requestTimeout, "requestTimeout")


class ActiveRequestScorer:
    """c <= idleThreshold: 1.0; else (maxCount - c) / maxCount * maxBusyScore, where maxCount
    is the largest count among the candidates."""

    type_name = "active-request-scorer"
    Params = ActiveRequestParams

    def __init__(self, name: str, params: ActiveRequestParams | None, handle: PluginHandle) -> None:
        p = params or ActiveRequestParams()
        self.name = name
        self.idle = p.idleThreshold
        self.max_busy = p.maxBusyScore
        self.timeout = duration_value(p.requestTimeout, "requestTimeout")
        self.clock = handle.clock
        self.counts: dict[Endpoint, int] = {}
        # request id -> (deadline, endpoints counted for it); insertion order = deadline order
        self._requests: OrderedDict[str, tuple[float, tuple[Endpoint, ...]]] = OrderedDict()

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        # No expiry here: scoring must not change state (explain runs it without committing).
        get = self.counts.get
        counts = [get(e, 0) for e in endpoints]
        max_count = max(counts, default=0)
        idle, busy = self.idle, self.max_busy
        return [1.0 if c <= idle else (max_count - c) / max_count * busy for c in counts]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        targets = []
        for r in result.profile_results.values():
            if r is not None and r.targets and r.targets[0] not in targets:
                targets.append(r.targets[0])
        self._expire()
        if not targets:
            return
        self._release(request.request_id)  # a retried id must not count twice
        for e in targets:
            self.counts[e] = self.counts.get(e, 0) + 1
        self._requests[request.request_id] = (self.clock() + self.timeout, tuple(targets))

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        self._release(request.request_id)

    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self.counts.pop(e, None)

    def _release(self, request_id: str) -> None:
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return
        for e in entry[1]:
            c = self.counts.get(e, 0) - 1
            if c > 0:
                self.counts[e] = c
            else:
                self.counts.pop(e, None)

    def _expire(self) -> None:
        if not self._requests:
            return
        now = self.clock()
        while self._requests:
            rid, (deadline, _) = next(iter(self._requests.items()))
            if deadline > now:
                break
            self._release(rid)
