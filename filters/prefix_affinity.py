"""prefix-cache-affinity-filter (the reference's scheduling/filter/prefixcacheaffinity/plugin.go):
keep the "sticky" endpoints, whose prefix score (matched / total blocks, from the match a
prefix producer published) is at least affinityThreshold, unless none is. With probability
explorationProbability keep all, so cold endpoints still get warmed. The TTFT load gate:
when maxTTFTPenaltyMs > 0 and the best sticky endpoint's estimated TTFT exceeds the best
other endpoint's by more than that, keep all. The estimate (ttftSource prefillThroughput) is
the endpoint's in-flight tokens (from an in-flight load producer) / peakPrefillThroughput;
with ttftSource latencyPredictor, the TTFT a predicted-latency producer published."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, bounded
from epp.framework.datakeys import (
    APPROX_PREFIX_PRODUCER,
    INFLIGHT_LOAD,
    INFLIGHT_LOAD_CONSUMER,
    INFLIGHT_LOAD_PRODUCER,
    LATENCY_PREDICTIONS,
    PREDICTED_LATENCY_PRODUCER,
    PREFIX_MATCH_CONSUMER,
    PREFIX_MATCH_INFO,
    ProducerParam,
)
from epp.framework.plugins import ConfiguredPlugin

PREFILL_THROUGHPUT, LATENCY_PREDICTOR = "prefillThroughput", "latencyPredictor"
# not Required: predictions are read only with ttftSource latencyPredictor
LATENCY_CONSUMER = ProducerParam("latencyPredictionInfoProducerName", PREDICTED_LATENCY_PRODUCER)


@dataclass(slots=True)
class PrefixAffinityParams:
    affinityThreshold: float = bounded(0.80, le=1)
    explorationProbability: float = bounded(0.0, ge=0, le=1)
    maxTTFTPenaltyMs: float = bounded(18000.0, ge=0)
    ttftSource: str = PREFILL_THROUGHPUT
    peakPrefillThroughput: float = bounded(15928.0, ge=0)  # prompt tokens per second
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER  # whose prefix match to read
    latencyPredictionInfoProducerName: str = ""  # read only with ttftSource latencyPredictor
    inFlightLoadProducerName: str = INFLIGHT_LOAD_PRODUCER
    prefixPluginName: str = ""  # v1.5 name; the config loader turns it into prefixMatchInfoProducerName

    def validate(self) -> None:
        if self.ttftSource not in (LATENCY_PREDICTOR, PREFILL_THROUGHPUT):
            raise ValueError(f"ttftSource: must be {LATENCY_PREDICTOR!r} or {PREFILL_THROUGHPUT!r}, "
                             f"got {self.ttftSource!r}")
        if self.ttftSource == PREFILL_THROUGHPUT and self.maxTTFTPenaltyMs > 0 and self.peakPrefillThroughput == 0:
            raise ValueError("peakPrefillThroughput: must be > 0 when ttftSource is prefillThroughput")


class PrefixCacheAffinityFilter(ConfiguredPlugin[PrefixAffinityParams]):
    type_name = "prefix-cache-affinity-filter"
    Params = PrefixAffinityParams
    consumes = (PREFIX_MATCH_CONSUMER, INFLIGHT_LOAD_CONSUMER, LATENCY_CONSUMER)

    def configure(self, p: PrefixAffinityParams, handle: PluginHandle) -> None:
        self.threshold = p.affinityThreshold
        self.exploration = p.explorationProbability
        self.max_penalty_ms = p.maxTTFTPenaltyMs
        self.use_predictor = p.ttftSource == LATENCY_PREDICTOR
        self._latency_key = self.producer_key(LATENCY_PREDICTIONS, LATENCY_CONSUMER)
        self.ms_per_token = 1000.0 / p.peakPrefillThroughput if p.peakPrefillThroughput else 0.0
        self.rng = handle.rng
        self._key = self.producer_key(PREFIX_MATCH_INFO, PREFIX_MATCH_CONSUMER)
        self._load_key = self.producer_key(INFLIGHT_LOAD, INFLIGHT_LOAD_CONSUMER)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if len(endpoints) <= 1 or self.threshold <= 0:
            return endpoints
        m = cycle.read(self._key)
        if m is None or not m.any_hit:
            return endpoints  # nothing can be sticky
        if self.exploration and self.rng.random() < self.exploration:
            return endpoints
        sticky, other = [], []
        for e in endpoints:
            (sticky if m.score(e) >= self.threshold else other).append(e)
        if not sticky:
            return endpoints
        if self.max_penalty_ms > 0 and other:
            ttft = self._ttft_ms(cycle)
            if min(map(ttft, sticky)) - min(map(ttft, other)) > self.max_penalty_ms:
                return endpoints  # the cached endpoints are too busy: let the scorers spread
        return sticky

    def _ttft_ms(self, cycle: CycleState) -> Callable[[Endpoint], float]:
        """Each endpoint's TTFT estimate: predicted (an endpoint without a prediction is never
        the fastest), or its in-flight tokens / peakPrefillThroughput (none: 0)."""
        if self.use_predictor:
            published = cycle.read(self._latency_key)
            predictions = published.endpoints if published is not None else {}
            return lambda e: predictions[e].ttft_ms if e in predictions else sys.float_info.max
        load = cycle.read(self._load_key)
        tokens = load.tokens if load is not None else {}
        return lambda e: tokens.get(e, 0) * self.ms_per_token
