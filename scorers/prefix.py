"""prefix-cache-scorer: score = leading prefix blocks the endpoint likely holds / the
request's blocks, read from the match a prefix producer published (by default the
approx-prefix-cache-producer; `prefixMatchInfoProducerName` names another). Without a
published match every endpoint scores 0.

Older configs set the matching parameters here (blockSize, blockSizeTokens,
maxPrefixBlocksToMatch, lruCapacityPerServer, autoTune); the config loader moves them to
an implicit producer, so such configs keep working unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import APPROX_PREFIX_PRODUCER, PREFIX_MATCH_INFO, ProducerParam

_MOVED = ("blockSize", "blockSizeTokens", "maxPrefixBlocksToMatch", "lruCapacityPerServer", "autoTune")


@dataclass(slots=True)
class PrefixScorerParams:
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER
    # v1.5: the producer's parameters, accepted here and moved to it by the config loader.
    blockSize: int | None = None
    blockSizeTokens: int | None = None
    maxPrefixBlocksToMatch: int | None = None
    lruCapacityPerServer: int | None = None
    autoTune: bool | None = None


class PrefixCacheScorer:
    type_name = "prefix-cache-scorer"
    Params = PrefixScorerParams
    consumes = (ProducerParam("prefixMatchInfoProducerName", APPROX_PREFIX_PRODUCER, moved_params=_MOVED),)

    def __init__(self, name: str, params: PrefixScorerParams | None, handle: PluginHandle) -> None:
        p = params or PrefixScorerParams()
        self.name = name
        self._key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        m = cycle.read(self._key)
        return [0.0] * len(endpoints) if m is None else m.scores(endpoints)
