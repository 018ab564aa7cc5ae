"""Approximate prefix-cache matching: the picker remembers which prompt-prefix blocks it
sent to which endpoint and prefers endpoints likely to hold the request's prefix.

Blocks are cut from the UTF-8 bytes of the prompt text (blockSizeTokens x 4 bytes; for
ASCII that is the reference's 4 characters per token) and chained with xxhash64:
h0 = xxh64(model + cache_salt), h_i = xxh64(block_i || le_uint64(h_{i-1})), so a block's
hash stands for the whole prefix up to it. The index (hash -> holders, per-endpoint LRUs)
is scorers/prefix_index.py.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from struct import Struct

from xxhash import xxh64_intdigest

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult
from epp.framework.registry import register
from scorers.prefix_index import PrefixIndex

CHARS_PER_TOKEN = 4
# Cycle-state keys: the generic key is read by plugins that compose with "the" prefix scorer
# (affinity filter, no-hit-LRU scorer, P/D decider); the named key when several exist.
PREFIX_STATE_KEY = "prefix-cache"


def prefix_state_key(plugin_name: str = "") -> str:
    return f"{PREFIX_STATE_KEY}/{plugin_name}" if plugin_name else PREFIX_STATE_KEY


# Many prompts share long prefixes (system prompts, chat history), so block hashes are
# memoised per group of blocks, keyed by one xxh64 of the group's bytes seeded with the
# chain hash entering it: a hit costs one hash call instead of GROUP_BLOCKS. (A 64-bit key
# collision would only mislead this approximate index, like any hash collision in it.)
# Pure function memo, so one bounded table serves every scorer instance. A dict in
# insertion order is the LRU: a hit is re-inserted at the end, eviction takes the front.
GROUP_BLOCKS = 16
_MEMO_CAPACITY = 8192
_memo: dict[int, tuple[int, ...]] = {}


@lru_cache(maxsize=512)  # a block size's counts 1..maxPrefixBlocksToMatch, plus the groups'
def _splitter(size: int, count: int) -> Callable[[bytes, int], tuple[bytes, ...]]:
    """unpack_from(data, offset) -> `count` consecutive `size`-byte pieces, in one C call."""
    return Struct(f"{size}s" * count).unpack_from


@lru_cache(maxsize=32)
def _block_and_parent(block_bytes: int) -> Callable[[bytes, int], bytes]:
    """pack(block, h) -> block || le_uint64(h), one allocation per block."""
    return Struct(f"<{block_bytes}sQ").pack


def _chain(data: bytes, start: int, count: int, block_bytes: int, h: int) -> list[int]:
    x = xxh64_intdigest
    pack = _block_and_parent(block_bytes)
    return [h := x(pack(block, h)) for block in _splitter(block_bytes, count)(data, start)]


def _remember(data: bytes, start: int, groups: int, group_bytes: int, h: int, hashes: list[int]) -> None:
    """Memoise the `groups` whole groups of `hashes` (chained from `h`, starting at `start`)."""
    seeds = [h, *hashes[GROUP_BLOCKS - 1:(groups - 1) * GROUP_BLOCKS:GROUP_BLOCKS]]
    keys = map(xxh64_intdigest, _splitter(group_bytes, groups)(data, start), seeds)
    memo = _memo
    memo.update(zip(keys, zip(*[iter(hashes[:groups * GROUP_BLOCKS])] * GROUP_BLOCKS, strict=True), strict=True))
    if len(memo) > _MEMO_CAPACITY:  # drop the older half at once: one scan of the dict's front
        deque(map(memo.__delitem__, list(islice(memo, len(memo) - _MEMO_CAPACITY // 2))), 0)


def block_hashes(text: str, model: str, salt: str, block_bytes: int, max_blocks: int) -> list[int]:
    """Chained hashes of the whole blocks of `text`, at most `max_blocks`."""
    if block_bytes <= 0 or max_blocks <= 0:
        return []
    limit = block_bytes * max_blocks
    # Encoding never yields fewer bytes than characters, so the character cut keeps enough.
    data = text[:limit].encode("utf-8", "surrogatepass")
    n = min(len(data) // block_bytes, max_blocks)
    if n == 0:
        return []
    h = xxh64_intdigest((model + salt).encode("utf-8", "surrogatepass"))
    out: list[int] = []
    group = GROUP_BLOCKS * block_bytes
    memo = _memo
    mv = memoryview(data)
    pos = 0
    groups = n // GROUP_BLOCKS
    for g in range(groups):
        key = xxh64_intdigest(mv[pos:pos + group], h)
        hs = memo.pop(key, None)
        if hs is None:
            # Past the first unseen group the chain is new: hash the rest in one pass and
            # remember each whole group for the next request that shares this prefix.
            rest = _chain(data, pos, n - g * GROUP_BLOCKS, block_bytes, h)
            _remember(data, pos, groups - g, group, h, rest)
            out += rest
            return out
        memo[key] = hs
        out += hs
        h = hs[-1]
        pos += group
    rest_n = n - groups * GROUP_BLOCKS
    if rest_n:
        out += _chain(data, pos, rest_n, block_bytes, h)
    return out


@dataclass(slots=True)
class PrefixMatch:
    """Stored in CycleState by PrepareData; read by the scorer, filters, deciders, pre-request."""

    hashes: list[int]
    block_size_tokens: int
    matches: dict[Endpoint, int] = field(default_factory=dict)  # leading blocks held per endpoint
    any_hit: bool = False  # some endpoint holds at least the first block

    @property
    def total(self) -> int:
        return len(self.hashes)

    def score(self, endpoint: Endpoint) -> float:
        return self.matches.get(endpoint, 0) / len(self.hashes) if self.hashes else 0.0

    def cached_tokens(self, endpoint: Endpoint) -> int:
        return self.matches.get(endpoint, 0) * self.block_size_tokens


@dataclass(slots=True)
class PrefixParams:
    blockSizeTokens: int = 16
    maxPrefixBlocksToMatch: int = 256
    lruCapacityPerServer: int = 31250
    autoTune: bool = True
    blockSize: int | None = None  # older configs: block size in characters (overrides blockSizeTokens)

    def validate(self) -> None:
        for key in ("blockSizeTokens", "maxPrefixBlocksToMatch", "lruCapacityPerServer"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)}")
        if self.blockSize is not None and self.blockSize <= 0:
            raise ValueError(f"blockSize: must be > 0, got {self.blockSize}")


@register
class PrefixCacheScorer:
    """Score = leading blocks the endpoint likely holds / the request's blocks.
    PrepareData computes the match; PreRequest records the request's blocks on the chosen
    endpoint(s); EndpointsChanged purges endpoints that left the pool."""

    type_name = "prefix-cache-scorer"
    Params = PrefixParams

    def __init__(self, name: str, params: PrefixParams | None, handle: PluginHandle) -> None:
        p = params or PrefixParams()
        self.name = name
        self.params = p
        self.index = PrefixIndex()
        self._key = prefix_state_key(name)

    def _block_size_tokens(self, endpoints: Sequence[Endpoint]) -> int:
        if self.params.autoTune:
            for e in endpoints:
                bs = e.metrics.block_size
                if bs:
                    return bs
        return self.params.blockSizeTokens

    def _capacity(self, endpoint: Endpoint) -> int:
        if self.params.autoTune and endpoint.metrics.num_gpu_blocks:
            return endpoint.metrics.num_gpu_blocks
        return self.params.lruCapacityPerServer

    def compute(self, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> PrefixMatch:
        p = self.params
        if p.blockSize is not None and not (p.autoTune and any(e.metrics.block_size for e in endpoints)):
            block_bytes = p.blockSize
            tokens = max(1, p.blockSize // CHARS_PER_TOKEN)
        else:
            tokens = self._block_size_tokens(endpoints)
            block_bytes = tokens * CHARS_PER_TOKEN
        hashes = block_hashes(request.prompt_text, request.target_model, request.cache_salt, block_bytes,
                              p.maxPrefixBlocksToMatch)
        matches, depth = self.index.match(hashes) if hashes else ({}, 0)
        return PrefixMatch(hashes, tokens, matches, depth > 0)

    # PrepareData
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        m = self.compute(request, endpoints)
        cycle[self._key] = m
        cycle.setdefault(PREFIX_STATE_KEY, m)

    # Scorer
    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        m: PrefixMatch | None = cycle.get(self._key)
        if m is None:  # used without the prepare-data step (e.g. called directly)
            m = self.compute(request, endpoints)
            cycle[self._key] = m
        total = len(m.hashes)
        if not total or not m.matches:
            return [0.0] * len(endpoints)
        get = m.matches.get
        return [get(e, 0) / total for e in endpoints]

    # PreRequest
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        m: PrefixMatch | None = cycle.get(self._key)
        if m is None or not m.hashes:
            return
        recorded: set[int] = set()
        for r in result.profile_results.values():
            if r is None or not r.targets:
                continue
            ep = r.targets[0]  # fallbacks are not where the prefix will be cached
            if id(ep) in recorded:
                continue
            recorded.add(id(ep))
            self.index.record(ep, m.hashes, self._capacity(ep))

    # EndpointsChanged
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self.index.purge(e)
