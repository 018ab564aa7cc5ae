"""prefix-cache-affinity-filter: keep the endpoints whose prefix score (from the prefix
scorer's match in CycleState) is at least affinityThreshold, unless none is; with
probability explorationProbability keep all, so cold endpoints still get warmed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.registry import register
from scorers.prefix import PrefixMatch, prefix_state_key


@dataclass(slots=True)
class PrefixAffinityParams:
    affinityThreshold: float = 0.80
    explorationProbability: float = 0.01
    prefixPluginName: str = ""  # which prefix-cache-scorer's match to read; "" = the first one

    def validate(self) -> None:
        if not 0.0 <= self.affinityThreshold <= 1.0:
            raise ValueError(f"affinityThreshold: must be in [0, 1], got {self.affinityThreshold}")
        if not 0.0 <= self.explorationProbability <= 1.0:
            raise ValueError(f"explorationProbability: must be in [0, 1], got {self.explorationProbability}")


@register
class PrefixCacheAffinityFilter:
    type_name = "prefix-cache-affinity-filter"
    Params = PrefixAffinityParams

    def __init__(self, name: str, params: PrefixAffinityParams | None, handle: PluginHandle) -> None:
        p = params or PrefixAffinityParams()
        self.name = name
        self.threshold = p.affinityThreshold
        self.exploration = p.explorationProbability
        self.rng = handle.rng
        self._key = prefix_state_key(p.prefixPluginName)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        m: PrefixMatch | None = cycle.get(self._key)
        if m is None or not m.any_hit:
            return endpoints
        if self.exploration and self.rng.random() < self.exploration:
            return endpoints
        kept = [e for e in endpoints if m.score(e) >= self.threshold]
        return kept if kept else endpoints
