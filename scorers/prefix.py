"""Approximate prefix-cache matching: the picker remembers which prompt-prefix blocks it
sent to which endpoint and prefers endpoints likely to hold the request's prefix.

Blocks are cut from the UTF-8 bytes of the prompt text (blockSizeTokens x 4 bytes; for
ASCII that is the reference's 4 characters per token) and chained with xxhash64:
h0 = xxh64(model + cache_salt), h_i = xxh64(block_i || le_uint64(h_{i-1})), so a block's
hash stands for the whole prefix up to it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from xxhash import xxh64_intdigest

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult
from epp.registry import register

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
# Pure function memo, so one bounded table serves every scorer instance.
GROUP_BLOCKS = 16
_MEMO_CAPACITY = 8192
_memo: OrderedDict[int, tuple[int, ...]] = OrderedDict()


def _chain(data: bytes, start: int, count: int, block_bytes: int, h: int) -> list[int]:
    x = xxh64_intdigest
    out = [0] * count
    i = 0
    for block in [data[off:off + block_bytes] for off in range(start, start + count * block_bytes, block_bytes)]:
        h = x(block + h.to_bytes(8, "little"))
        out[i] = h
        i += 1
    return out


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
        hs = memo.get(key)
        if hs is None:
            # Past the first unseen group the chain is new: hash the rest in one pass and
            # remember each whole group for the next request that shares this prefix.
            rest = _chain(data, pos, n - g * GROUP_BLOCKS, block_bytes, h)
            for j in range(groups - g):
                start = pos + j * group
                k = key if j == 0 else xxh64_intdigest(mv[start:start + group], rest[j * GROUP_BLOCKS - 1])
                memo[k] = tuple(rest[j * GROUP_BLOCKS:(j + 1) * GROUP_BLOCKS])
            while len(memo) > _MEMO_CAPACITY:
                memo.popitem(last=False)
            out += rest
            return out
        memo.move_to_end(key)
        out += hs
        h = hs[-1]
        pos += group
    rest_n = n - groups * GROUP_BLOCKS
    if rest_n:
        out += _chain(data, pos, rest_n, block_bytes, h)
    return out


class PrefixIndex:
    """hash -> endpoints holding it, plus one LRU of hashes per endpoint. Evicting a hash
    from an endpoint's LRU removes the endpoint from that hash's holders.

    A hash held by one endpoint (the usual case) maps to that Endpoint itself, by several
    to a set: at steady state every recorded block evicts one, and allocating a set per
    block would dominate the cost of recording a long prompt."""

    def __init__(self) -> None:
        self._holders: dict[int, Endpoint | set[Endpoint]] = {}
        self._lrus: dict[Endpoint, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, h: int) -> frozenset[Endpoint]:
        v = self._holders.get(h)
        if v is None:
            return frozenset()
        return frozenset(v) if type(v) is set else frozenset((v,))

    def endpoint_size(self, endpoint: Endpoint) -> int:
        lru = self._lrus.get(endpoint)
        return len(lru) if lru is not None else 0

    def match(self, hashes: Sequence[int]) -> tuple[dict[Endpoint, int], int]:
        """Each endpoint's number of leading hashes held, and the depth: how many leading
        hashes some endpoint holds (a walk would stop at the first hash nobody holds).

        `record` keeps holders(h_i) a subset of holders(h_i-1) (see there), so holder sets
        only shrink along the chain: the depth is found by bisection, and so are the few
        places where the holder set shrinks; cost O(changes * log(blocks)), not O(blocks)."""
        get = self._holders.get
        n = len(hashes)
        if not n or get(hashes[0]) is None:
            return {}, 0
        # depth: holders(h[depth-1]) non-empty, holders(h[depth]) empty (or depth == n)
        if get(hashes[n - 1]) is not None:
            depth = n
        else:
            lo, hi = 0, n - 1  # holders(h[lo]) non-empty, holders(h[hi]) empty
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if get(hashes[mid]) is not None:
                    lo = mid
                else:
                    hi = mid
            depth = hi

        def size(i: int) -> int:
            v = get(hashes[i])
            return len(v) if type(v) is set else 1

        # indices c where |holders(h_c)| < |holders(h_c-1)|, in order
        changes: list[int] = []
        stack = [(0, size(0), depth - 1, size(depth - 1))]
        while stack:
            a, sa, b, sb = stack.pop()
            if sa == sb:
                continue
            if b - a == 1:
                changes.append(b)
                continue
            m = (a + b) // 2
            sm = size(m)
            stack.append((m, sm, b, sb))  # popped after the left half: changes stay ordered
            stack.append((a, sa, m, sm))
        counts: dict[Endpoint, int] = {}
        prev = self.holders(hashes[0])
        for c in changes:
            cur = self.holders(hashes[c])
            for ep in prev - cur:
                counts[ep] = c
            prev = cur
        for ep in prev:
            counts[ep] = depth
        return counts, depth

    def record(self, endpoint: Endpoint, hashes: Sequence[int], capacity: int) -> None:
        lru = self._lrus.get(endpoint)
        if lru is None:
            lru = self._lrus[endpoint] = OrderedDict()
        holders_map = self._holders
        get = holders_map.get
        move = lru.move_to_end
        # Newest last: walking the chain backwards leaves a request's leading blocks the most
        # recently used, so eviction drops trailing blocks first (as vLLM does) and an endpoint
        # holding block i always holds block i-1, which keeps `match` cheap.
        for h in reversed(hashes):
            if h in lru:
                move(h)
                continue
            lru[h] = None
            v = get(h)
            if v is None:
                holders_map[h] = endpoint
            elif type(v) is set:
                v.add(endpoint)
            elif v is not endpoint:
                holders_map[h] = {v, endpoint}
        excess = len(lru) - capacity
        if excess > 0:
            pop = lru.popitem
            for _ in range(excess):
                h = pop(last=False)[0]
                v = get(h)
                if v is endpoint:  # inlined _drop: the common case at steady state
                    del holders_map[h]
                else:
                    self._drop(h, endpoint)

    def _drop(self, h: int, endpoint: Endpoint) -> None:
        holders_map = self._holders
        v = holders_map.get(h)
        if v is endpoint:
            del holders_map[h]
        elif type(v) is set:
            v.discard(endpoint)
            if len(v) == 1:
                holders_map[h] = next(iter(v))
            elif not v:
                del holders_map[h]

    def purge(self, endpoint: Endpoint) -> None:
        lru = self._lrus.pop(endpoint, None)
        if lru is None:
            return
        for h in lru:
            self._drop(h, endpoint)


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
