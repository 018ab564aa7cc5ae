"""prefix-cache-affinity-filter: keep the endpoints whose prefix score (from the match a
prefix producer published) is at least affinityThreshold, unless none is; with
probability explorationProbability keep all, so cold endpoints still get warmed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, bounded
from epp.framework.datakeys import APPROX_PREFIX_PRODUCER, PREFIX_MATCH_INFO, PREFIX_MATCH_PRODUCER


@dataclass(slots=True)
class PrefixAffinityParams:
    affinityThreshold: float = bounded(0.80, ge=0, le=1)
    explorationProbability: float = bounded(0.01, ge=0, le=1)
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER  # whose prefix match to read
    prefixPluginName: str = ""  # v1.5 name; the config loader turns it into prefixMatchInfoProducerName


class PrefixCacheAffinityFilter:
    type_name = "prefix-cache-affinity-filter"
    Params = PrefixAffinityParams
    consumes = (PREFIX_MATCH_PRODUCER,)

    def __init__(self, name: str, params: PrefixAffinityParams | None, handle: PluginHandle) -> None:
        p = params or PrefixAffinityParams()
        self.name = name
        self.threshold = p.affinityThreshold
        self.exploration = p.explorationProbability
        self.rng = handle.rng
        self._key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        m = cycle.read(self._key)
        if m is None or not m.any_hit:
            return endpoints
        if self.exploration and self.rng.random() < self.exploration:
            return endpoints
        kept = [e for e in endpoints if m.score(e) >= self.threshold]
        return kept if kept else endpoints
