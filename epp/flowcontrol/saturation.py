"""The utilization-detector plugin: a saturation detector that is also a filter.

Saturation is what admission asks before it lets a request through (legacy shedding)
or releases one from the flow-control queues; the filter keeps scheduling away from
endpoints over the same thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.plugins import ConfiguredPlugin
from epp.units import duration_value


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
        duration_value(self.metricsStalenessThreshold, "metricsStalenessThreshold")


class UtilizationDetector(ConfiguredPlugin[UtilizationParams]):
    """Filter: keep endpoints under both thresholds (times 1+headroom), unless none pass.
    Saturation: mean over endpoints of max(queue/queueDepthThreshold, kv/kvCacheUtilThreshold);
    an endpoint whose metrics are stale or missing counts as 1.0. No endpoints: 1.0."""

    type_name = "utilization-detector"
    Params = UtilizationParams

    def configure(self, p: UtilizationParams, handle: PluginHandle) -> None:
        self.queue_threshold = p.queueDepthThreshold
        self.kv_threshold = p.kvCacheUtilThreshold
        self.staleness = duration_value(p.metricsStalenessThreshold, "metricsStalenessThreshold")
        self.headroom = p.headroom
        self.clock = handle.clock
        self.stale = 0  # endpoints scored as saturated for stale or missing metrics at the last saturation()
        handle.metrics.gauge("llm_d_epp_flow_control_stale_endpoints", "Endpoints whose metrics the saturation "
                             "detector treats as stale.", lambda: self.stale, {"detector": self.name})

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
            self.stale = 0  # an empty pool is not a metrics failure
            return 1.0
        now = self.clock()
        q, kv = self.queue_threshold, self.kv_threshold
        total = 0.0
        stale = 0
        for e in endpoints:
            if not self._fresh(e, now):
                total += 1.0
                stale += 1
                continue
            m = e.metrics
            total += max(m.waiting_queue_size / q, m.kv_cache_usage_percent / kv)
        self.stale = stale
        return total / len(endpoints)
