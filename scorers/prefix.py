"""prefix-cache-scorer: scores each endpoint from the prefix match a producer published (by
default the approx-prefix-cache-producer; `prefixMatchInfoProducerName` names another).
As the reference (scheduling/scorer/prefix/plugin.go):
  score = w * min(1, matched_blocks * block_size_tokens / matchLengthScaleTokens)^2
          + (1 - w) * matched_blocks / total_blocks,     w = matchLengthWeight (default 0)
Without a published match every endpoint scores 0.

v1.5 configs set the matching parameters here (blockSize, blockSizeTokens,
maxPrefixBlocksToMatch, lruCapacityPerServer, autoTune); today's reference refuses them, this
picker keeps them working: the config loader moves them to an implicit producer that keeps
GIE v1.5.0's semantics (legacyV15: blockSize in characters, 256 blocks, no 64-token floor)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, bounded
from epp.framework.datakeys import (
    APPROX_PREFIX_PRODUCER,
    PREFIX_MATCH_INFO,
    PREFIX_MATCH_PRODUCER,
    ProducerParam,
)
from epp.framework.plugins import ConfiguredPlugin

_MOVED = ("blockSize", "blockSizeTokens", "maxPrefixBlocksToMatch", "lruCapacityPerServer", "autoTune")


@dataclass(slots=True)
class PrefixScorerParams:
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER
    matchLengthWeight: float = bounded(0.0, ge=0, le=1)
    matchLengthScaleTokens: int = 8192
    # v1.5: the producer's parameters, accepted here and moved to it by the config loader.
    blockSize: int | None = None
    blockSizeTokens: int | None = None
    maxPrefixBlocksToMatch: int | None = None
    lruCapacityPerServer: int | None = None
    autoTune: bool | None = None

    def validate(self) -> None:
        if self.matchLengthWeight > 0 and self.matchLengthScaleTokens <= 0:
            raise ValueError(f"matchLengthScaleTokens: must be > 0 when matchLengthWeight is > 0, "
                             f"got {self.matchLengthScaleTokens}")


class PrefixCacheScorer(ConfiguredPlugin[PrefixScorerParams]):
    type_name = "prefix-cache-scorer"
    Params = PrefixScorerParams
    consumes = (ProducerParam("prefixMatchInfoProducerName", APPROX_PREFIX_PRODUCER, moved_params=_MOVED,
                              required=True, moved_defaults=(("legacyV15", True),)),)

    def configure(self, p: PrefixScorerParams, handle: PluginHandle) -> None:
        self._key = self.producer_key(PREFIX_MATCH_INFO, PREFIX_MATCH_PRODUCER)
        self.weight = p.matchLengthWeight
        self.scale = p.matchLengthScaleTokens

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        m = cycle.read(self._key)
        if m is None:
            return [0.0] * len(endpoints)
        ratios = m.scores(endpoints)
        w = self.weight
        if not w or m.block_size_tokens <= 0:
            return ratios
        get, bs, scale = m.matches.get, m.block_size_tokens, self.scale
        out = []
        for e, ratio in zip(endpoints, ratios, strict=True):
            length = min(1.0, get(e, 0) * bs / scale)
            out.append(w * length * length + (1.0 - w) * ratio)
        return out
