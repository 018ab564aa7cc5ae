"""no-hit-lru-scorer: spreads new prefixes. For a request no endpoint has a prefix hit for,
endpoints never given a cold request score 1.0, the rest by how long ago they last got
one (least recent highest, in (0, 1)); warm requests score 0.5 everywhere so the prefix
scorer decides."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult
from epp.framework.registry import register
from scorers.prefix import PrefixMatch, prefix_state_key


@dataclass(slots=True)
class NoHitLRUParams:
    lruSize: int = 1024
    prefixPluginName: str = ""  # which prefix-cache-scorer's match to read; "" = the first one

    def validate(self) -> None:
        if self.lruSize <= 0:
            raise ValueError(f"lruSize: must be > 0, got {self.lruSize}")


@register
class NoHitLRUScorer:
    type_name = "no-hit-lru-scorer"
    Params = NoHitLRUParams

    def __init__(self, name: str, params: NoHitLRUParams | None, handle: PluginHandle) -> None:
        p = params or NoHitLRUParams()
        self.name = name
        self.size = p.lruSize
        self._key = prefix_state_key(p.prefixPluginName)
        self._lru: OrderedDict[Endpoint, None] = OrderedDict()  # oldest cold assignment first

    def _cold(self, cycle: CycleState) -> bool:
        m: PrefixMatch | None = cycle.get(self._key)
        return m is None or not m.any_hit

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        if not self._cold(cycle):
            return [0.5] * len(endpoints)
        lru = self._lru
        # Rank used candidates from least to most recently used.
        if lru:
            candidates = set(endpoints)
            used = [e for e in lru if e in candidates]
        else:
            used = []
        m = len(used)
        rank = {e: i for i, e in enumerate(used)}
        return [1.0 if e not in rank else (m - rank[e]) / (m + 1) for e in endpoints]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not self._cold(cycle) or not result.targets:
            return
        e = result.targets[0]
        self._lru.pop(e, None)
        self._lru[e] = None
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)

    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self._lru.pop(e, None)
