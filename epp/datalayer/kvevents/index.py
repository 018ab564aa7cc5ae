"""The block index: which endpoints hold which prefix blocks, and on which medium.

Built from the servers' KV events (BlockStored, BlockRemoved, AllBlocksCleared), keyed
by the picker's own block keys (keys.py), so a prompt's keys find the blocks a server
reported however that server seeds its hashes. Per endpoint, the server's own block
hashes map to the picker's keys, so a BlockRemoved or a child's parent hash resolves.

Structure and cost. One LRU map, block key -> holder mask: three bits per endpoint slot
(GPU, CPU i.e. offloaded to any non-GPU medium, speculative). Per endpoint, a dict from
the server's block hash to the key (or keys, when the server's block is a multiple of
blockSizeTokens). Bounded by `max_blocks` keys (least recently stored or matched is
evicted first), `max_blocks_per_endpoint` server hashes per endpoint (an endpoint
reporting more is cleared and counted in `overflows`: its view then refills from new
events) and `max_holders_per_key` entries (endpoint, tier) per key, the reference's
inMemoryConfig.podCacheSize: a key's entries are an LRU by the time each was last stored,
so the entry least recently stored is dropped when one more arrives (`holder_evictions`).
A key with two or more entries keeps their order in a side table (a tuple of bit
positions); a key held once keeps none. Memory per block, measured by bench/kvindex_cost.py (tracemalloc, CPython,
64-bit): about 195 bytes with one endpoint holding it, 390 with two (185 and 372 MiB
per million blocks; the second entry brings the key's order table), so the default
max_blocks of 2 million is about 400-800 MiB.

Lookup walks a prompt's keys in order and keeps, as one integer mask, the endpoints
still matching: the match of an endpoint is the number of leading blocks it holds in
any tier; per block, the tiers it is held in (PrefixMatch.weighted: the reference's
LongestPrefixScorer counts each block at the highest weight among its tiers). It stops
at the first key no candidate holds, so an uncached prompt costs one key. Matched keys
are refreshed in the LRU.

Speculative entries: `speculate(endpoint, keys)` marks blocks as held by the endpoint
a request was just routed to, for `speculative_ttl` seconds or until the server's
BlockStored confirms them (then they are simply held); expiry runs lazily at the next
lookup or speculation, so there is no timer task.

Not indexed: events of KV-cache groups other than 0 (hybrid models' secondary groups),
BlockStored whose token count is not blocks x block_size or whose server block size is
neither a multiple nor a divisor of blockSizeTokens (counted in `mismatched`), the tail of
an event of smaller server blocks that does not fill a picker block (as llm-d-kv-cache,
which keys each event's tokens at its own block size), and BlockStored whose parent
the endpoint never reported (stored before the subscription began, or in a lost batch):
its key depends on the parent's tokens, so it is counted in `unchained` and that prefix
stays invisible until the server stores the parent again (or ends inside a picker block).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from epp.datalayer.kvevents.keys import BlockKeyer
from epp.datalayer.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["BlockIndex", "IndexStats", "PrefixMatch", "medium_tier"]

_GPU, _CPU, _SPEC = 0, 1, 2  # bit offsets within an endpoint's three-bit slot
_BITS = 3


def medium_tier(medium: str | None) -> int:
    """0 for GPU (vLLM's default when medium is absent), 1 for any offload medium."""
    return _GPU if medium is None or medium.upper() == "GPU" else _CPU


@dataclass(slots=True)
class PrefixMatch:
    """An endpoint's longest matched prefix, in blocks of blockSizeTokens, by tier."""

    blocks: int = 0
    gpu_blocks: int = 0
    cpu_blocks: int = 0  # held offloaded and not on GPU
    speculative_blocks: int = 0  # only speculatively held
    # per matched block, in order, the 3-bit pattern of the tiers holding it (1 GPU, 2 CPU, 4 speculative)
    tiers: bytes = field(default=b"", compare=False, repr=False)

    def weighted(self, gpu: float, cpu: float, speculative: float) -> float:
        """The matched blocks summed in order, each at the highest weight among its tiers
        (the reference's LongestPrefixScorer with fillMaxWeights: the same float sum, so
        the same truncation); without tiers, by the exclusive counts."""
        if not self.tiers:
            return self.gpu_blocks * gpu + self.cpu_blocks * cpu + self.speculative_blocks * speculative
        table = [0.0] + [max(w for bit, w in ((1, gpu), (2, cpu), (4, speculative)) if p & bit) for p in range(1, 8)]
        if all(table[p] == 1.0 for p in range(1, 8) if p in self.tiers):
            return float(len(self.tiers))  # a sum of ones is exact in any order
        # one addition after another (in C), as Go's loop; not sum(), which compensates since 3.12
        return deque(accumulate(map(table.__getitem__, self.tiers)), maxlen=1)[0]

    def by_tier(self) -> dict[str, int]:
        """Per tier, the leading blocks held in it with no gap (the reference's
        CachedBlocksByTier, which counts them while some tier still holds every block so
        far: that is each tier's own run); without tiers, the exclusive counts."""
        if not self.tiers:
            counts = {"gpu": self.gpu_blocks, "cpu": self.cpu_blocks, "speculative": self.speculative_blocks}
            return {k: v for k, v in counts.items() if v}
        out: dict[str, int] = {}
        for name, has in _HAS_TIER.items():
            run = self.tiers.translate(has).find(0)
            if run:
                out[name] = len(self.tiers) if run < 0 else run
        return out


_HAS_TIER = {name: bytes(1 if p & bit else 0 for p in range(256))  # bytes.translate tables: pattern -> has tier
             for name, bit in (("gpu", 1), ("cpu", 2), ("speculative", 4))}


@dataclass(slots=True)
class IndexStats:
    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    evictions: int = 0  # keys dropped by the max_blocks bound
    holder_evictions: int = 0  # entries dropped by the max_holders_per_key bound (podCacheSize)
    removed_hashes: int = 0  # server hashes named by BlockRemoved (group 0), known or not
    overflows: int = 0  # endpoints cleared by the max_blocks_per_endpoint bound
    unchained: int = 0  # BlockStored whose parent hash the endpoint never reported
    mismatched: int = 0  # BlockStored not indexable (token count, block size, extras)
    skipped_groups: int = 0  # events of KV-cache groups other than 0
    speculated_blocks: int = 0
    speculative_expired: int = 0


@dataclass(slots=True)
class _Endpoint:
    name: str
    slot: int
    engine: dict[int, int | tuple[int, ...]] = field(default_factory=dict)  # server hash -> key(s)
    spec: dict[int, float] = field(default_factory=dict)  # key -> speculative expiry


class BlockIndex:
    def __init__(self, keyer: BlockKeyer | None = None, *, max_blocks: int = 2_000_000,
                 max_blocks_per_endpoint: int = 1_000_000, max_endpoints: int = 4096,
                 max_holders_per_key: int = 10, speculative_ttl: float = 2.0, max_speculative_blocks: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, v in (("max_blocks", max_blocks), ("max_blocks_per_endpoint", max_blocks_per_endpoint),
                        ("max_endpoints", max_endpoints), ("max_holders_per_key", max_holders_per_key),
                        ("max_speculative_blocks", max_speculative_blocks)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not speculative_ttl > 0:
            raise ValueError(f"speculative_ttl must be positive, got {speculative_ttl!r}")
        self.keyer = keyer or BlockKeyer()
        self.max_blocks = max_blocks  # bound: keys in the index
        self.max_blocks_per_endpoint = max_blocks_per_endpoint  # bound: server hashes per endpoint
        self.max_endpoints = max_endpoints  # bound: endpoint slots
        self.max_holders_per_key = max_holders_per_key  # bound: (endpoint, tier) entries per key
        self.max_speculative_blocks = max_speculative_blocks  # bound: pending speculative keys
        self.speculative_ttl = speculative_ttl
        self.clock = clock
        self.stats = IndexStats()
        self._map: OrderedDict[int, int] = OrderedDict()  # key -> holder mask, LRU first
        self._order: dict[int, tuple[int, ...]] = {}  # key with >= 2 entries -> their bit positions, oldest first
        self._endpoints: dict[str, _Endpoint] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._slot_names: dict[int, str] = {}
        self._slot_mask = 0  # bit 3s set for every slot s in use
        self._spec_queue: deque[tuple[float, _Endpoint, tuple[int, ...]]] = deque()
        self._spec_pending = 0
        self.on_server_cleared: Callable[[str], None] | None = None  # told of server_cleared

    # --- endpoints -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._map)

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def blocks_of(self, endpoint: str) -> int:
        """Server blocks the endpoint has reported and not removed (by its own hashes)."""
        ep = self._endpoints.get(endpoint)
        return 0 if ep is None else len(ep.engine)

    def _endpoint(self, name: str) -> _Endpoint:
        ep = self._endpoints.get(name)
        if ep is None:
            if len(self._endpoints) >= self.max_endpoints:
                raise ValueError(f"block index full: {self.max_endpoints} endpoints")
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            self._next_slot = max(self._next_slot, slot + 1)
            ep = self._endpoints[name] = _Endpoint(name, slot)
            self._slot_names[slot] = name
            self._slot_mask |= 1 << (_BITS * slot)
        return ep

    def clear_endpoint(self, name: str) -> None:
        """Forget everything the endpoint holds (AllBlocksCleared, a restart, an overflow)."""
        ep = self._endpoints.get(name)
        if ep is None:
            return
        clear = ~(0b111 << (_BITS * ep.slot))
        for value in ep.engine.values():
            for key in (value,) if isinstance(value, int) else value:
                self._and(key, clear)
        for key in ep.spec:
            self._and(key, clear)
        self._spec_pending -= len(ep.spec)
        ep.engine.clear()
        ep.spec.clear()
        self.stats.cleared += 1

    def server_cleared(self, name: str) -> None:
        """The server itself dropped its whole cache (AllBlocksCleared, or its publisher
        restarted): forget its blocks and tell `on_server_cleared`, whose guesses about that
        server are wrong now too."""
        self.clear_endpoint(name)
        if self.on_server_cleared is not None:
            self.on_server_cleared(name)

    def remove_endpoint(self, name: str) -> None:
        ep = self._endpoints.get(name)
        if ep is None:
            return
        self.clear_endpoint(name)
        del self._endpoints[name]
        del self._slot_names[ep.slot]
        self._slot_mask &= ~(1 << (_BITS * ep.slot))
        self._free_slots.append(ep.slot)

    # --- events ----------------------------------------------------------------------

    def apply(self, endpoint: str, events: Iterable[KVEvent], model: str = "") -> None:
        """Apply one batch's events, in order, as reported by `endpoint` serving `model`."""
        for ev in events:
            if isinstance(ev, BlockStored):
                self.stored(endpoint, ev, model)
            elif isinstance(ev, BlockRemoved):
                self.removed(endpoint, ev)
            elif isinstance(ev, AllBlocksCleared):
                self.server_cleared(endpoint)

    def stored(self, endpoint: str, ev: BlockStored, model: str = "") -> None:
        if ev.group_idx:
            self.stats.skipped_groups += 1
            return
        ep = self._endpoint(endpoint)
        bit = 1 << (_BITS * ep.slot + medium_tier(ev.medium))
        if not ev.token_ids:  # a location-only event (offload): the blocks are already known
            for h in ev.block_hashes:
                value = ep.engine.get(h)
                for key in () if value is None else (value,) if isinstance(value, int) else value:
                    self._or(key, bit)
                    self.stats.stored_blocks += 1
            return
        ratio, rest = divmod(ev.block_size, self.keyer.block_size)
        group = self.keyer.block_size // ev.block_size if ratio == 0 and not self.keyer.block_size % ev.block_size \
            else 1  # server blocks per picker block, when the server's are smaller
        n_keys = len(ev.block_hashes) // group
        if (rest and group == 1) or len(ev.token_ids) != len(ev.block_hashes) * ev.block_size or not n_keys:
            self.stats.mismatched += 1
            return
        parent = None
        if ev.parent_block_hash is not None:
            value = ep.engine.get(ev.parent_block_hash)
            if value is None or type(value) is _Inner:  # unknown, or ends inside a picker block
                self.stats.unchained += 1
                return
            parent = value if isinstance(value, int) else value[-1]
        try:
            keys = self.keyer.keys(ev.token_ids[:n_keys * group * ev.block_size], ev.lora_name or model, parent,
                                   _extras(ev.extra_keys, ev.lora_name, len(ev.block_hashes), ratio or 1, group))
        except ValueError:  # extras nested too deeply to encode: a key cannot be made
            self.stats.mismatched += 1
            return
        if group > 1:  # a removal of any of a picker block's server blocks clears its key; the tail is not kept
            for j, h in enumerate(ev.block_hashes[:n_keys * group]):
                ep.engine[h] = keys[j // group] if j % group == group - 1 else _Inner(keys[j // group])
        for j, h in enumerate(ev.block_hashes if group == 1 else ()):
            ep.engine[h] = keys[j] if ratio == 1 else tuple(keys[j * ratio:(j + 1) * ratio])
        for key in keys:
            self._or(key, bit)
        self.stats.stored_blocks += len(keys)
        if len(ep.engine) > self.max_blocks_per_endpoint:
            self.stats.overflows += 1
            self.clear_endpoint(endpoint)

    def removed(self, endpoint: str, ev: BlockRemoved) -> None:
        if ev.group_idx:
            self.stats.skipped_groups += 1
            return
        ep = self._endpoints.get(endpoint)
        if ep is None:
            self.stats.removed_hashes += len(ev.block_hashes)
            return
        base = _BITS * ep.slot
        tiers = 0b11 << base
        clear = ~(1 << (base + medium_tier(ev.medium)))
        self.stats.removed_hashes += len(ev.block_hashes)
        for h in ev.block_hashes:
            value = ep.engine.get(h)
            if value is None:
                continue
            held = 0
            for key in (value,) if isinstance(value, int) else value:
                held |= self._and(key, clear) & tiers
                self.stats.removed_blocks += 1
            if not held:
                del ep.engine[h]

    def _or(self, key: int, bit: int) -> None:
        """Add one entry (a single bit) to a key, as its most recently stored; past
        max_holders_per_key entries the least recently stored one is dropped."""
        m = self._map.get(key)
        if m is None:
            self._map[key] = bit
            if len(self._map) > self.max_blocks:
                old, _ = self._map.popitem(last=False)
                self._order.pop(old, None)
                self.stats.evictions += 1
            return
        self._map.move_to_end(key)
        pos = bit.bit_length() - 1
        order = self._order.get(key) or (m.bit_length() - 1,)  # a key held once: its only entry
        if m & bit:
            if len(order) > 1 and order[-1] != pos:  # stored again: now the most recent
                self._order[key] = (*(q for q in order if q != pos), pos)
            return
        m |= bit
        order = (*order, pos)
        if len(order) > self.max_holders_per_key:
            m &= ~(1 << order[0])
            order = order[1:]
            self.stats.holder_evictions += 1
        self._map[key] = m
        if len(order) > 1:
            self._order[key] = order
        else:
            self._order.pop(key, None)

    def _and(self, key: int, keep: int) -> int:
        """Clear bits of a key; the remaining mask (0 if the key is gone)."""
        m = self._map.get(key)
        if m is None:
            return 0
        m &= keep
        if m:
            self._map[key] = m
            order = self._order.get(key)
            if order is not None:
                order = tuple(q for q in order if m >> q & 1)
                if len(order) > 1:
                    self._order[key] = order
                else:
                    del self._order[key]
        else:
            del self._map[key]
            self._order.pop(key, None)
        return m

    # --- lookup ----------------------------------------------------------------------

    def match(self, token_ids: Sequence[int], model: str = "", endpoints: Iterable[str] | None = None,
              extras: Sequence[object] | None = None) -> dict[str, PrefixMatch]:
        """The longest prefix of `token_ids` each endpoint holds (endpoints with none are
        absent), computing keys only as far as some endpoint still matches."""
        return self.match_keys(self.keyer.iter_keys(token_ids, model, None, extras), endpoints)

    def match_keys(self, keys: Iterable[int], endpoints: Iterable[str] | None = None) -> dict[str, PrefixMatch]:
        self.expire()
        alive = self._slot_mask if endpoints is None else self._mask_of(endpoints)
        masks: list[int] = []
        ended: dict[int, int] = {}  # slot bit -> matched blocks
        data = self._map
        for key in keys:
            if not alive:
                break
            m = data.get(key)
            held = 0 if m is None else (m | m >> 1 | m >> 2) & alive
            if held != alive:
                _record(alive & ~held, len(masks), ended)
                alive = held
                if not alive:
                    break
            data.move_to_end(key)
            masks.append(m)
        _record(alive, len(masks), ended)
        return {self._slot_names[bit.bit_length() // _BITS]: _tiers(masks, n, bit.bit_length() - 1)
                for bit, n in ended.items() if n}

    def _mask_of(self, endpoints: Iterable[str]) -> int:
        mask = 0
        for name in endpoints:
            ep = self._endpoints.get(name)
            if ep is not None:
                mask |= 1 << (_BITS * ep.slot)
        return mask

    # --- speculation -----------------------------------------------------------------

    def speculate(self, endpoint: str, keys: Sequence[int], now: float | None = None) -> None:
        """Mark `keys` as held by `endpoint` (a request was just routed there) until the
        server confirms them or `speculative_ttl` passes."""
        now = self.clock() if now is None else now
        self.expire(now)
        ep = self._endpoint(endpoint)
        keys = tuple(keys)[: self.max_speculative_blocks]
        expiry = now + self.speculative_ttl
        bit = 1 << (_BITS * ep.slot + _SPEC)
        for key in keys:
            if key not in ep.spec:
                self._spec_pending += 1
            ep.spec[key] = expiry
            self._or(key, bit)
        self._spec_queue.append((expiry, ep, keys))
        self.stats.speculated_blocks += len(keys)
        while self._spec_pending > self.max_speculative_blocks and self._spec_queue:
            self._expire_record(*self._spec_queue.popleft(), now=float("inf"))

    def expire(self, now: float | None = None) -> None:
        q = self._spec_queue
        if not q:
            return
        now = self.clock() if now is None else now
        while q and q[0][0] <= now:
            self._expire_record(*q.popleft(), now=now)

    def _expire_record(self, expiry: float, ep: _Endpoint, keys: tuple[int, ...], now: float) -> None:
        if self._endpoints.get(ep.name) is not ep:
            return  # the endpoint left (or was replaced) since
        clear = ~(1 << (_BITS * ep.slot + _SPEC))
        for key in keys:
            until = ep.spec.get(key)
            if until is not None and until <= max(now, expiry):
                del ep.spec[key]
                self._spec_pending -= 1
                self._and(key, clear)
                self.stats.speculative_expired += 1


def _record(dropped: int, n: int, ended: dict[int, int]) -> None:
    while dropped:
        low = dropped & -dropped
        ended[low] = n
        dropped ^= low


def _tiers(masks: list[int], n: int, base: int) -> PrefixMatch:
    tiers = bytes([m >> base & 0b111 for m in masks[:n]])
    gpu = tiers.count(1) + tiers.count(3) + tiers.count(5) + tiers.count(7)
    spec = tiers.count(4)
    return PrefixMatch(n, gpu, n - gpu - spec, spec, tiers)


def _extras(extra_keys: tuple[object, ...] | None, lora_name: str | None, n_blocks: int,
            ratio: int, group: int = 1) -> list[object] | None:
    """Per picker block, what taints its key beyond the tokens: vLLM's extra_keys entry for
    the server block minus the LoRA name (already in the root), None when nothing is left;
    with `group` server blocks per picker block, their entries joined in order."""
    if not extra_keys:
        return None
    out: list[object] = []
    for j in range(n_blocks):
        entry = extra_keys[j] if j < len(extra_keys) else None
        rest = None if entry is None else tuple(e for e in entry if e != lora_name) or None  # type: ignore[union-attr]
        out.extend([rest] * ratio)
    if group > 1:
        out = [tuple(e for part in out[i:i + group] if part for e in part) or None  # type: ignore[union-attr]
               for i in range(0, len(out) - group + 1, group)]
    return out if any(e is not None for e in out) else None


class _Inner(int):
    """The key of the picker block a server block lies inside of, not at the end of: a
    child event whose parent is such a block starts mid-block, so it cannot be keyed."""

    __slots__ = ()
