"""no-hit-lru-scorer (the reference's scheduling/scorer/nohitlru/no_hit_lru.go): spreads new
prefixes. A request is cold when no candidate holds a block of its prefix (from the match a
prefix producer published). Cold: with n candidates, those never given a cold request rank
first in candidate order, then the used ones from least to most recently used (their
position in the whole LRU); rank r scores 1 - r/(n - 1), at least 0 (one candidate: 1.0).
Warm requests score 0.5 everywhere, so the prefix scorer decides. A cold request's primary
target, and its prefill target, become the most recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, DataKey, Endpoint, InferenceRequest, PluginHandle, SchedulingResult
from epp.framework.datakeys import APPROX_PREFIX_PRODUCER, PREFIX_MATCH_CONSUMER, PREFIX_MATCH_INFO
from epp.framework.plugins import ConfiguredPlugin

DEFAULT_LRU_SIZE = 1024
PREFILL_PROFILE = "prefill"


@dataclass(slots=True)
class NoHitLRUParams:
    lruSize: int = DEFAULT_LRU_SIZE  # <= 0: the default, as the reference
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER  # whose prefix match to read
    prefixPluginName: str = ""  # v1.5 name; the config loader turns it into prefixMatchInfoProducerName
    prefixPluginType: str = ""  # v1.5; the reference accepts and ignores it


class NoHitLRUScorer(ConfiguredPlugin[NoHitLRUParams]):
    type_name = "no-hit-lru-scorer"
    Params = NoHitLRUParams
    consumes = (PREFIX_MATCH_CONSUMER,)

    def configure(self, p: NoHitLRUParams, handle: PluginHandle) -> None:
        self.size = p.lruSize if p.lruSize > 0 else DEFAULT_LRU_SIZE
        self._key = self.producer_key(PREFIX_MATCH_INFO, PREFIX_MATCH_CONSUMER)
        self._cold: DataKey[bool] = self.own_key("cold", bool)
        self._lru: OrderedDict[Endpoint, None] = OrderedDict()  # oldest cold assignment first

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        m = cycle.read(self._key)
        cold = m is None or not any(m.matches.get(e, 0) > 0 for e in endpoints)
        cycle.write(self._cold, cold)
        if not cold:
            return [0.5] * len(endpoints)
        n = len(endpoints)
        if n == 1:
            return [1.0]
        position = {e: i for i, e in enumerate(self._lru)}
        never = [e for e in endpoints if e not in position]
        rank = {e: i for i, e in enumerate(never)}
        for e in endpoints:
            if e in position:
                rank[e] = len(never) + position[e]
        span = n - 1
        return [max(0.0, 1.0 - rank[e] / span) for e in endpoints]

    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        if not cycle.read(self._cold):
            return  # warm, or not scored: nothing to record (the reference's missing state)
        for profile in (result.primary_profile, PREFILL_PROFILE):
            r = result.profile_results.get(profile)
            if r is not None and r.targets:
                self._touch(r.targets[0])

    def _touch(self, e: Endpoint) -> None:
        self._lru.pop(e, None)
        self._lru[e] = None
        while len(self._lru) > self.size:
            self._lru.popitem(last=False)

    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self._lru.pop(e, None)
