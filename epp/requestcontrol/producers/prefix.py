"""approx-prefix-cache-producer: the picker remembers which prompt-prefix blocks it sent
to which endpoint and publishes, per request, how many leading blocks each candidate
likely holds (PrefixCacheMatchInfo under PREFIX_MATCH_INFO.of(<its name>)).

PrepareData hashes the prompt's blocks (prefix_blocks.py) and matches them against the
index (prefix_index.py); PreRequest records the blocks on each profile's chosen endpoint
and observes the hit metrics; EndpointsChanged purges endpoints that left the pool.
prefix-cache-scorer, prefix-cache-affinity-filter, no-hit-lru-scorer and
prefix-based-pd-decider read the published match."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult, bounded
from epp.framework.datakeys import PREFIX_MATCH_INFO, DataKey, PrefixCacheMatchInfo
from epp.framework.plugins import ConfiguredPlugin
from epp.requestcontrol.producers.prefix_blocks import (
    CHARS_PER_TOKEN,
    DEFAULT_MAX_PREFIX_BLOCKS,
    block_hashes,
)
from epp.requestcontrol.producers.prefix_index import DEFAULT_LRU_CAPACITY, PrefixIndex

log = logging.getLogger(__name__)

# The reference's prefix indexer metrics: names, help and buckets unchanged.
INDEXER_SIZE = "inference_extension_prefix_indexer_size"
HIT_RATIO = "inference_extension_prefix_indexer_hit_ratio"
HIT_BYTES = "inference_extension_prefix_indexer_hit_bytes"
# ... and today's names, labelled with the producer's plugin_name and plugin_type.
LLMD_INDEXER_SIZE, LLMD_HIT_RATIO, LLMD_HIT_BYTES = (
    "llm_d_epp_prefix_indexer_size", "llm_d_epp_prefix_indexer_hit_ratio", "llm_d_epp_prefix_indexer_hit_bytes")
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_BYTES_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)  # the reference's


MIN_BLOCK_SIZE_TOKENS = 64  # the reference's floor (#1158): one index entry per (endpoint, block)
UNLIMITED_BLOCKS = 1 << 31  # both caps 0: the whole prompt (bounded by the request body limit)
DEFAULT_MAX_PREFIX_TOKENS = 131072  # the reference's maxPrefixTokensToMatch default
V15_MAX_PREFIX_BLOCKS = 256  # GIE v1.5.0's default, kept for configs in the v1.5 form (see legacyV15)


@dataclass(slots=True)
class PrefixProducerParams:
    """The reference's parameters and defaults (approximateprefix/types.go, plugin.go).
    maxPrefixTokensToMatch wins when > 0 (blocks = tokens // block size); the deprecated
    maxPrefixBlocksToMatch applies only when it is 0; both 0 match the whole prompt. Block
    sizes below 64 tokens, configured or engine-reported, are raised to 64. The deprecated
    blockSize maps onto blockSizeTokens when that is left at its default.

    legacyV15 (project): GIE v1.5.0's semantics, which the config loader sets on the
    implicit producer it makes from a v1.5-form prefix-cache-scorer's parameters (today's
    reference refuses that form): blockSize in characters, maxPrefixBlocksToMatch 256, no
    token cap, no 64-token floor."""

    autoTune: bool = True
    blockSizeTokens: int = bounded(16, gt=0)
    blockSize: int | None = bounded(None, ge=0)  # deprecated
    maxPrefixTokensToMatch: int | None = bounded(None, ge=0)  # None: 131072 (legacyV15: 0)
    maxPrefixBlocksToMatch: int | None = bounded(None, ge=0)  # None: 2048 (legacyV15: 256)
    lruCapacityPerServer: int = bounded(DEFAULT_LRU_CAPACITY, ge=0)  # 0: the default
    legacyV15: bool = False


def resolve_max_blocks(p: PrefixProducerParams, block_size_tokens: int) -> int:
    """The per-request block cap (the reference's resolveMaxBlocks)."""
    tokens = p.maxPrefixTokensToMatch
    if tokens is None:
        tokens = 0 if p.legacyV15 else DEFAULT_MAX_PREFIX_TOKENS
    if tokens > 0 and block_size_tokens > 0:
        return tokens // block_size_tokens
    blocks = p.maxPrefixBlocksToMatch
    if blocks is None:
        blocks = V15_MAX_PREFIX_BLOCKS if p.legacyV15 else DEFAULT_MAX_PREFIX_BLOCKS
    return blocks if blocks > 0 else UNLIMITED_BLOCKS


class ApproxPrefixCacheProducer(ConfiguredPlugin[PrefixProducerParams]):
    type_name = "approx-prefix-cache-producer"
    Params = PrefixProducerParams

    def configure(self, p: PrefixProducerParams, handle: PluginHandle) -> None:
        if p.blockSize and not p.legacyV15:
            log.warning("%s: 'blockSize' is deprecated; use 'blockSizeTokens' instead", self.name)
            if p.blockSizeTokens == 16:  # left at its default: the deprecated value takes its place
                p.blockSizeTokens = p.blockSize
            p.blockSize = None
        if not p.legacyV15 and p.blockSizeTokens < MIN_BLOCK_SIZE_TOKENS:
            log.info("%s: blockSizeTokens %d is below the minimum, %d is used", self.name, p.blockSizeTokens,
                     MIN_BLOCK_SIZE_TOKENS)
        self.params = p
        self._floor = 1 if p.legacyV15 else MIN_BLOCK_SIZE_TOKENS
        self.index = PrefixIndex()
        self.key = PREFIX_MATCH_INFO.of(self.name)
        self._hashes: DataKey[list[int]] = self.own_key("hashes", list)
        m = handle.metrics
        me = {"plugin_name": self.name, "plugin_type": type(self).type_name}
        for size_name, labels in ((INDEXER_SIZE, None), (LLMD_INDEXER_SIZE, me)):
            m.gauge(size_name, "Size of the prefix indexer.", self.index.__len__, labels)
        ratio_doc = "Ratio of prefix length matched to total prefix length in the cache lookup."
        bytes_doc = "Length of the prefix match in number of bytes in the cache lookup."
        self._hit_ratios = (m.histogram(HIT_RATIO, ratio_doc, _RATIO_BUCKETS).observe,
                            m.histogram(LLMD_HIT_RATIO, ratio_doc, _RATIO_BUCKETS, me).observe)
        self._hit_bytes = (m.histogram(HIT_BYTES, bytes_doc, _BYTES_BUCKETS).observe,
                           m.histogram(LLMD_HIT_BYTES, bytes_doc, _BYTES_BUCKETS, me).observe)

    def _block_size_tokens(self, endpoints: Sequence[Endpoint]) -> int:
        bs = self.params.blockSizeTokens
        if self.params.autoTune and endpoints and endpoints[0].metrics.block_size:  # the first, as the reference
            bs = endpoints[0].metrics.block_size
        return max(bs, self._floor)

    def _capacity(self, endpoint: Endpoint) -> int:
        if self.params.autoTune and endpoint.metrics.num_gpu_blocks:
            return endpoint.metrics.num_gpu_blocks
        return self.params.lruCapacityPerServer or DEFAULT_LRU_CAPACITY

    def match(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> tuple[list[int], PrefixCacheMatchInfo]:
        """The request's block hashes and how many leading blocks each endpoint holds."""
        p = self.params
        if p.blockSize and not (p.autoTune and endpoints and endpoints[0].metrics.block_size):
            block_bytes = p.blockSize
            tokens = max(1, p.blockSize // CHARS_PER_TOKEN)
        else:
            tokens = self._block_size_tokens(endpoints)
            block_bytes = tokens * CHARS_PER_TOKEN
        hashes = block_hashes(request.prompt_text, request.target_model, request.cache_salt, block_bytes,
                              resolve_max_blocks(p, tokens), partial=not p.legacyV15)
        matches, depth = self.index.match(hashes) if hashes else ({}, 0)
        # The index's holder sets shrink along the chain, so the deepest match is some endpoint's count.
        return hashes, PrefixCacheMatchInfo(matches, len(hashes), tokens, depth)

    # PrepareData
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        hashes, info = self.match(request, endpoints)
        cycle.write(self.key, info)
        cycle.write(self._hashes, hashes)

    # PreRequest
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        hashes = cycle.read(self._hashes)
        if not hashes:
            return
        recorded: set[int] = set()
        for r in result.profile_results.values():
            if r is None or not r.targets:
                continue
            ep = r.targets[0]  # fallbacks are not where the prefix will be cached
            if id(ep) in recorded:
                continue
            recorded.add(id(ep))
            self.index.record(ep, hashes, self._capacity(ep))
        info = cycle.read(self.key)
        if info is not None:
            ratio, hit_bytes = info.longest / len(hashes), info.longest * info.block_size_tokens * CHARS_PER_TOKEN
            for observe in self._hit_ratios:
                observe(ratio)
            for observe in self._hit_bytes:
                observe(hit_bytes)

    # EndpointsChanged
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self.index.purge(e)
