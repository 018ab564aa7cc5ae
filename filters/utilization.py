"""utilization-filter (the reference's scheduling/filter/utilization/): keeps the endpoints
that satisfy every condition {metric, maxValue} (value <= maxValue); a metric an endpoint
lacks counts as 0. Metrics: active-requests (the requests in flight there, from the
in-flight load producer named by inFlightLoadProducerName, default inflight-load-producer),
running-requests and waiting-queue (the model server's), kv-cache-utilization (a fraction,
maxValue <= 1). At least one condition; maxValue required and >= 0. When every endpoint is
dropped and fallbackOnEmpty is set, the candidates are returned unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import (
    INFLIGHT_LOAD,
    INFLIGHT_LOAD_CONSUMER,
    InFlightLoadInfo,
)
from epp.framework.plugins import ConfiguredPlugin

ACTIVE_REQUESTS = "active-requests"
RUNNING_REQUESTS = "running-requests"
WAITING_QUEUE = "waiting-queue"
KV_CACHE_UTILIZATION = "kv-cache-utilization"
METRICS = (ACTIVE_REQUESTS, RUNNING_REQUESTS, WAITING_QUEUE, KV_CACHE_UTILIZATION)


@dataclass(slots=True)
class Condition:
    metric: str = ""
    maxValue: float | None = None


@dataclass(slots=True)
class UtilizationFilterParams:
    conditions: list[Condition] = field(default_factory=list)
    fallbackOnEmpty: bool = False
    inFlightLoadProducerName: str = ""  # "": inflight-load-producer

    def validate(self) -> None:
        if not self.conditions:
            raise ValueError("conditions: at least one condition is required")
        for i, c in enumerate(self.conditions):
            if c.metric not in METRICS:
                raise ValueError(f"conditions[{i}].metric: must be one of {', '.join(METRICS)}, got {c.metric!r}")
            if c.maxValue is None:
                raise ValueError(f"conditions[{i}].maxValue: required for {c.metric!r}")
            if not c.maxValue >= 0:  # also NaN
                raise ValueError(f"conditions[{i}].maxValue: must be >= 0, got {c.maxValue}")
            if c.metric == KV_CACHE_UTILIZATION and c.maxValue > 1:
                raise ValueError(f"conditions[{i}].maxValue: {KV_CACHE_UTILIZATION} is a fraction, must be <= 1, "
                                 f"got {c.maxValue}")


def _finite(v: float) -> float:
    return v if math.isfinite(v) else (0.0 if v != v else v)  # NaN counts as missing (0); +-inf compare as such


_READ: dict[str, Callable[[Endpoint], float]] = {
    RUNNING_REQUESTS: lambda e: float(e.metrics.running_requests_size),
    WAITING_QUEUE: lambda e: float(e.metrics.waiting_queue_size),
    KV_CACHE_UTILIZATION: lambda e: _finite(e.metrics.kv_cache_usage_percent),
}


class UtilizationFilter(ConfiguredPlugin[UtilizationFilterParams]):
    type_name = "utilization-filter"
    Params = UtilizationFilterParams
    # the reference requires the producer only when a condition reads active-requests; a class
    # declaration cannot depend on the parameters, so the default producer is added whenever
    # this filter is configured (it then tracks in-flight requests nobody else may read)
    consumes = (INFLIGHT_LOAD_CONSUMER,)

    def configure(self, p: UtilizationFilterParams, handle: PluginHandle) -> None:
        self.conditions = [(c.metric, float(c.maxValue)) for c in p.conditions if c.maxValue is not None]
        self.fallback = p.fallbackOnEmpty
        self._key = self.producer_key(INFLIGHT_LOAD, INFLIGHT_LOAD_CONSUMER)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        load = cycle.read(self._key)
        requests = load.requests if isinstance(load, InFlightLoadInfo) else {}
        kept = []
        for e in endpoints:
            for metric, cap in self.conditions:
                value = float(requests.get(e, 0)) if metric == ACTIVE_REQUESTS else _READ[metric](e)
                if value > cap:
                    break
            else:
                kept.append(e)
        if not kept and self.fallback:
            return endpoints
        return kept
