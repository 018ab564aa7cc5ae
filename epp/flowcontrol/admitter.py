"""The probabilistic-admitter plugin (the reference's requestcontrol/admitter/
probabilisticadmitter): an Admitter that sheds sheddable requests (priority < 0) with a
probability rising steeply with the pool's saturation.

saturation = mean over the candidate endpoints of max(waiting queue / queueDepthThreshold,
KV-cache usage / kvCacheUtilThreshold) (an endpoint without metrics counts 1.0);
p(reject) = min(saturation^power x k, 1). Defaults queueDepthThreshold 5,
kvCacheUtilThreshold 0.8, power 5, k 300; each must be > 0. Requests of priority >= 0 and
requests with no candidate endpoint are always admitted. A denial is answered as the
reference's director answers any Admit denial: 500 "request cannot be admitted: ...".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.plugins import ConfiguredPlugin


@dataclass(slots=True)
class ProbabilisticAdmitterParams:
    queueDepthThreshold: int = 5
    kvCacheUtilThreshold: float = 0.8
    power: float = 5.0
    k: float = 300.0

    def validate(self) -> None:
        if self.queueDepthThreshold <= 0:
            raise ValueError(f"queueDepthThreshold: must be > 0, got {self.queueDepthThreshold}")
        for key in ("kvCacheUtilThreshold", "power", "k"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{key}: must be > 0, got {value}")


class ProbabilisticAdmitter(ConfiguredPlugin[ProbabilisticAdmitterParams]):
    type_name = "probabilistic-admitter"
    Params = ProbabilisticAdmitterParams

    def configure(self, p: ProbabilisticAdmitterParams, handle: PluginHandle) -> None:
        self.queue_threshold = float(p.queueDepthThreshold)
        self.kv_threshold = p.kvCacheUtilThreshold
        self.power = p.power
        self.k = p.k
        self.rng = handle.rng

    def pool_saturation(self, endpoints: Sequence[Endpoint]) -> float:
        total = 0.0
        for e in endpoints:
            m = e.metrics
            if m is None:
                total += 1.0
                continue
            total += max(m.waiting_queue_size / self.queue_threshold, m.kv_cache_usage_percent / self.kv_threshold)
        return total / len(endpoints)

    def reject_probability(self, endpoints: Sequence[Endpoint]) -> float:
        return self._probability(self.pool_saturation(endpoints))

    def _probability(self, saturation: float) -> float:
        try:
            return min(saturation ** self.power * self.k, 1.0)
        except OverflowError:
            return 1.0

    def admit_request(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> str | None:
        """None to admit, else the reason for denying."""
        if request.priority >= 0 or not endpoints:
            return None
        sat = self.pool_saturation(endpoints)
        prob = self._probability(sat)
        if self.rng.random() < prob:
            return f"probabilistic-admitter: rejected, saturation={sat:.3f} prob={prob:.2f}"
        return None
