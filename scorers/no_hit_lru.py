"""no-hit-lru-scorer: spreads new prefixes. For a request no endpoint has a prefix hit for,
endpoints never given a cold request score 1.0, the rest by how long ago they last got
one (least recent highest, in (0, 1)); warm requests score 0.5 everywhere so the prefix
scorer decides."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult, bounded
from epp.framework.datakeys import APPROX_PREFIX_PRODUCER, PREFIX_MATCH_INFO, PREFIX_MATCH_PRODUCER


@dataclass(slots=True)
class NoHitLRUParams:
    lruSize: int = bounded(1024, gt=0)
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER  # whose prefix match to read
    prefixPluginName: str = ""  # v1.5 name; the config loader turns it into prefixMatchInfoProducerName


class NoHitLRUScorer:
    type_name = "no-hit-lru-scorer"
    Params = NoHitLRUParams
    consumes = (PREFIX_MATCH_PRODUCER,)

    def __init__(self, name: str, params: NoHitLRUParams | None, handle: PluginHandle) -> None:
        p = params or NoHitLRUParams()
        self.name = name
        self.size = p.lruSize
        self._key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName)
        self._lru: OrderedDict[Endpoint, None] = OrderedDict()  # oldest cold assignment first

    def _cold(self, cycle: CycleState) -> bool:
        m = cycle.read(self._key)
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
