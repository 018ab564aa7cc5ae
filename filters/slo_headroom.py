"""slo-headroom-tier-filter (the reference's scheduling/filter/sloheadroomtier): splits the
endpoints by the headroom a predicted-latency producer published (LATENCY_PREDICTIONS):
positive tier = TTFT and TPOT headroom both >= 0; negative = the rest, and endpoints without
a prediction. Both tiers present: the negative tier with probability epsilonExploreNeg
(default 0.01, in [0, 1]; so overloaded endpoints still get the odd request and their state
is learnt again), else the positive one. One tier: that tier. No prediction at all, or at
most one endpoint: all kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, bounded
from epp.framework.datakeys import LATENCY_PREDICTIONS, PREDICTED_LATENCY_CONSUMER, PredictionConsumerParams
from epp.framework.plugins import ConfiguredPlugin


@dataclass(slots=True)
class SLOHeadroomTierParams(PredictionConsumerParams):
    epsilonExploreNeg: float = bounded(0.01, ge=0, le=1)


class SLOHeadroomTierFilter(ConfiguredPlugin[SLOHeadroomTierParams]):
    type_name = "slo-headroom-tier-filter"
    Params = SLOHeadroomTierParams
    consumes = (PREDICTED_LATENCY_CONSUMER,)

    def configure(self, p: SLOHeadroomTierParams, handle: PluginHandle) -> None:
        self.epsilon = p.epsilonExploreNeg
        self.rng = handle.rng
        self._key = self.producer_key(LATENCY_PREDICTIONS, PREDICTED_LATENCY_CONSUMER)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if len(endpoints) <= 1:
            return endpoints
        published = cycle.read(self._key)
        predictions = published.endpoints if published is not None else {}
        positive, negative = [], []
        for e in endpoints:
            info = predictions.get(e)
            if info is not None and info.positive_headroom:
                positive.append(e)
            else:
                negative.append(e)
        if len(negative) == len(endpoints) and not any(e in predictions for e in endpoints):
            return endpoints  # no predictions: keep all
        if positive and negative:
            return negative if self.rng.random() < self.epsilon else positive
        return positive or negative
