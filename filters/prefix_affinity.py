"""prefix-cache-affinity-filter (the reference's scheduling/filter/prefixcacheaffinity/plugin.go):
keep the "sticky" endpoints, whose prefix score (matched / total blocks, from the match a
prefix producer published) is at least affinityThreshold, unless none is. With probability
explorationProbability keep all, so cold endpoints still get warmed. The TTFT load gate:
when maxTTFTPenaltyMs > 0 and the best sticky endpoint's estimated TTFT exceeds the best
other endpoint's by more than that, keep all. The estimate (ttftSource prefillThroughput) is
the endpoint's in-flight tokens (from an in-flight load producer) / peakPrefillThroughput."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, bounded
from epp.framework.datakeys import (
    APPROX_PREFIX_PRODUCER,
    INFLIGHT_LOAD,
    INFLIGHT_LOAD_CONSUMER,
    INFLIGHT_LOAD_PRODUCER,
    PREFIX_MATCH_CONSUMER,
    PREFIX_MATCH_INFO,
)
from epp.framework.plugins import ConfiguredPlugin

PREFILL_THROUGHPUT, LATENCY_PREDICTOR = "prefillThroughput", "latencyPredictor"


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
        if self.ttftSource == LATENCY_PREDICTOR:
            if self.maxTTFTPenaltyMs > 0:
                raise ValueError("ttftSource: latencyPredictor needs latency-aware routing (issue 13), not built yet")
        elif self.ttftSource != PREFILL_THROUGHPUT:
            raise ValueError(f"ttftSource: must be {LATENCY_PREDICTOR!r} or {PREFILL_THROUGHPUT!r}, "
                             f"got {self.ttftSource!r}")
        elif self.maxTTFTPenaltyMs > 0 and self.peakPrefillThroughput == 0:
            raise ValueError("peakPrefillThroughput: must be > 0 when ttftSource is prefillThroughput")


class PrefixCacheAffinityFilter(ConfiguredPlugin[PrefixAffinityParams]):
    type_name = "prefix-cache-affinity-filter"
    Params = PrefixAffinityParams
    consumes = (PREFIX_MATCH_CONSUMER, INFLIGHT_LOAD_CONSUMER)

    def configure(self, p: PrefixAffinityParams, handle: PluginHandle) -> None:
        self.threshold = p.affinityThreshold
        self.exploration = p.explorationProbability
        self.max_penalty_ms = p.maxTTFTPenaltyMs if p.ttftSource == PREFILL_THROUGHPUT else 0.0
        self.ms_per_token = 1000.0 / p.peakPrefillThroughput if p.peakPrefillThroughput else 0.0
        self.rng = handle.rng
        self._key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName or APPROX_PREFIX_PRODUCER)
        self._load_key = INFLIGHT_LOAD.of(p.inFlightLoadProducerName or INFLIGHT_LOAD_PRODUCER)

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
            load = cycle.read(self._load_key)
            tokens = load.tokens if load is not None else {}
            best_sticky = min(tokens.get(e, 0) for e in sticky) * self.ms_per_token
            best_other = min(tokens.get(e, 0) for e in other) * self.ms_per_token
            if best_sticky - best_other > self.max_penalty_ms:
                return endpoints  # the cached endpoints are too busy: let the scorers spread
        return sticky
