"""The approximate prefix index: hash -> endpoints holding it, plus one LRU of block hashes
per endpoint; evicting a hash from an endpoint's LRU removes the endpoint from the hash's
holders. Same contents and order as one OrderedDict per endpoint (record = move each hash
to the end walking the request's hashes backwards, then pop the oldest over capacity),
stored so that a request costs a few C-level dict operations, not a Python loop per block:

- An endpoint's LRU is a linked list of runs, oldest first: a run is the hashes one
  `record` call added, LRU-ordered from its last hash to its first.
- The holders map points each hash at the run holding it (held by several endpoints: at
  a dict endpoint -> run). A re-touched hash is re-pointed at the new run, leaving a hole
  in its old one; eviction pops a run's trailing hashes in bulk and skips the holes.
- A request that starts with an intact run of the endpoint (a repeated prompt, a shared
  system prompt, a chat's previous turn) moves that run, split at the divergence, rather
  than re-pointing each of its blocks.

Nothing here assumes the hashes are a chain: any ints give exactly the OrderedDict LRU
(tests/test_plugins_prefix.py checks it against one)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import compress, count, repeat
from operator import ne

from epp.framework import Endpoint

__all__ = ["DEFAULT_LRU_CAPACITY", "PrefixIndex"]

DEFAULT_LRU_CAPACITY = 31250  # blocks per endpoint whose KV size is unknown: the reference's lruCapacityPerServer


class _Run:
    """The hashes one `record` call put on one endpoint. Positions >= `hi` are evicted;
    below it, a position is live iff the holders map still points at this run for its
    hash (else it is a hole: re-touched by a newer run). `live` counts live positions."""

    __slots__ = ("endpoint", "hashes", "hi", "live", "prev", "next")

    def __init__(self, endpoint: Endpoint | None, hashes: tuple[int, ...]) -> None:
        self.endpoint = endpoint
        self.hashes = hashes
        self.hi = len(hashes)
        self.live = len(hashes)
        self.prev: _Run = self
        self.next: _Run = self


class _EndpointLRU:
    """The endpoint's runs, oldest first, as a doubly linked list: a run whose blocks were
    all re-touched leaves from the middle in O(1) (repeats of a prompt cannot pile up
    runs), and a run split by a shared prefix keeps its place."""

    __slots__ = ("end", "size")

    def __init__(self) -> None:
        self.end = _Run(None, ())  # sentinel: end.next is the oldest run, end.prev the newest
        self.size = 0  # live blocks

    def __iter__(self) -> Iterator[_Run]:
        run = self.end.next
        while run is not self.end:
            yield run
            run = run.next

    def append(self, run: _Run) -> None:
        self.insert_before(self.end, run)

    @staticmethod
    def insert_before(at: _Run, run: _Run) -> None:
        prev = at.prev
        run.prev, run.next = prev, at
        prev.next = at.prev = run

    @staticmethod
    def unlink(run: _Run) -> None:
        run.prev.next = run.next
        run.next.prev = run.prev


class _Shared(dict):
    """Endpoint -> _Run, for a hash held by two or more endpoints. Hashed by identity,
    so a request's distinct older holders can be collected in a set."""

    __slots__ = ()
    __hash__ = object.__hash__  # type: ignore[assignment]


_Holders = _Run | _Shared


def _first_occurrences(hashes: tuple[int, ...]) -> tuple[int, ...]:
    # The OrderedDict walk (last to first) leaves a repeated hash where it was touched last.
    return tuple(dict.fromkeys(hashes))


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, _Holders] = {}
        self._lrus: dict[Endpoint, _EndpointLRU] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, h: int) -> frozenset[Endpoint]:
        v = self._holders.get(h)
        if v is None:
            return frozenset()
        return frozenset(v) if type(v) is _Shared else frozenset((v.endpoint,))

    def endpoints(self) -> list[Endpoint]:
        """The endpoints holding blocks."""
        return list(self._lrus)

    def endpoint_size(self, endpoint: Endpoint) -> int:
        lru = self._lrus.get(endpoint)
        return lru.size if lru is not None else 0

    def blocks(self, endpoint: Endpoint) -> list[int]:
        """The endpoint's hashes, least recently used first (for tests and debugging)."""
        lru = self._lrus.get(endpoint)
        if lru is None:
            return []
        get = self._holders.get
        out = []
        for run in lru:
            for h in reversed(run.hashes[:run.hi]):
                v = get(h)
                if v is run or (type(v) is _Shared and v.get(endpoint) is run):
                    out.append(h)
        return out

    def match(self, hashes: Sequence[int]) -> tuple[dict[Endpoint, int], int]:
        """Each endpoint's number of leading hashes held, and the depth: how many leading
        hashes some endpoint holds (a walk would stop at the first hash nobody holds).

        For chained hashes `record` keeps holders(h_i) a subset of holders(h_i-1): it
        touches a chain's blocks from the last to the first, so a block is never older
        than its successor in any LRU. Holder sets only shrink along the chain, so the
        depth is found by bisection, and so are the few places where the holder set
        shrinks; cost O(changes * log(blocks)), not O(blocks)."""
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
            return len(v) if type(v) is _Shared else 1

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
        v = get(hashes[0])
        if not changes and type(v) is not _Shared:  # the usual case: one holder all the way
            return {v.endpoint: depth}, depth
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
        """Touch `hashes` on the endpoint's LRU (first hash most recent), then evict its
        least recently used blocks beyond `capacity`."""
        lru = self._lrus.get(endpoint)
        if lru is None:
            lru = self._lrus[endpoint] = _EndpointLRU()
        if hashes:
            th = tuple(hashes)
            if not self._move_runs(lru, endpoint, th):
                self._add(lru, _Run(endpoint, th))
        if lru.size > capacity:
            self._evict(lru, lru.size - capacity)

    def _move_runs(self, lru: _EndpointLRU, endpoint: Endpoint, th: tuple[int, ...]) -> bool:
        """If the request starts with the leading blocks of the endpoint's intact runs (a
        repeated prompt, a shared system prompt, the previous turn of a chat), move those
        runs as wholes instead of touching their blocks one by one; the rest is added as a
        new run. False (nothing changed) when it does not, or to keep a repeated hash exact."""
        get = self._holders.get
        r = get(th[0])
        segments: list[tuple[_Run, int]] = []
        pos, n = 0, len(th)
        while type(r) is _Run and r.endpoint is endpoint and r.live == r.hi == len(r.hashes):
            k = len(r.hashes)
            if th[pos:pos + k] != r.hashes:  # common length of the request's rest and the run
                k = next(compress(count(), map(ne, th[pos:], r.hashes)), min(n - pos, k))
                if not k:
                    break
            segments.append((r, k))
            pos += k
            if pos == n:
                break
            r = get(th[pos])
        if not segments:
            return False
        if len(segments) > 1 and len({r for r, _ in segments}) != len(segments):
            return False  # one run twice: a repeated hash
        rest = th[pos:]
        if rest:
            before = list(map(get, rest))
            moved = {r for r, _ in segments}
            for v in set(before):  # a hash both in a moving run and later in the request
                if v in moved or (type(v) is _Shared and v.get(endpoint) in moved):
                    return False
        runs = [self._split(lru, r, k) for r, k in segments]
        if rest:
            self._add(lru, _Run(endpoint, rest), before)
        for r in reversed(runs):  # the request's first blocks end up most recent
            lru.append(r)
        return True

    def _split(self, lru: _EndpointLRU, run: _Run, k: int) -> _Run:
        """Take the first k positions of `run` out of the LRU and return the (unlinked) run
        holding them; the rest, if any, keeps its place. Whichever part is smaller becomes
        a new run: only its holders are rewritten."""
        n = len(run.hashes)
        if k == n:
            lru.unlink(run)
            return run
        part = _Run(run.endpoint, run.hashes[:k] if k <= n - k else run.hashes[k:])
        self._repoint(part.hashes, run, part)
        if k <= n - k:  # `run` keeps the tail in place
            run.hashes = run.hashes[k:]
            run.hi = run.live = n - k
            return part
        lru.insert_before(run, part)
        lru.unlink(run)
        run.hashes = run.hashes[:k]
        run.hi = run.live = k
        return run

    def _repoint(self, hashes: tuple[int, ...], old: _Run, new: _Run) -> None:
        """Hand `old`'s holding of `hashes` (all live in it) to `new`."""
        holders = self._holders
        before = list(map(holders.get, hashes))
        if before.count(old) == len(before):
            holders.update(zip(hashes, repeat(new)))
            return
        for h, v in zip(hashes, before, strict=True):
            if v is old:
                holders[h] = new
            else:  # held by other endpoints too
                v[new.endpoint] = new

    def _add(self, lru: _EndpointLRU, run: _Run, before: list[_Holders | None] | None = None) -> None:
        """Append `run` (fully live) to the LRU; `before`: who held each of its hashes (None:
        nobody), looked up here if not given. A hash's holder `run` itself also means nobody."""
        holders = self._holders
        n = len(run.hashes)
        size0 = len(holders)
        if before is None:  # look up and insert the new ones in one pass
            before = list(map(holders.setdefault, run.hashes, repeat(run)))
            fresh = before.count(run) == n
        else:
            fresh = before.count(None) == n
            if fresh:
                holders.update(zip(run.hashes, repeat(run)))
        if fresh:  # nobody held any of them: the no-shared-prefix case
            if len(holders) - size0 != n:  # a repeated hash (only a 64-bit collision makes one)
                run.hashes = _first_occurrences(run.hashes)
                run.hi = run.live = n = len(run.hashes)
        else:
            if len(set(run.hashes)) != n:
                run.hashes = _first_occurrences(run.hashes)
                run.hi = run.live = n = len(run.hashes)
                before = list(map(holders.get, run.hashes))
            n -= self._retouch(lru, run, before)
        lru.append(run)
        lru.size += n

    def _retouch(self, lru: _EndpointLRU, run: _Run, before: list[_Holders | None]) -> int:
        """Point `run.hashes` at `run`, given who held each before; returns how many of them
        the endpoint already held (they leave holes in its older runs)."""
        holders = self._holders
        endpoint = run.endpoint
        holders.update(zip(run.hashes, repeat(run)))
        held = 0
        shared = False
        # Usually the few distinct older holders are this endpoint's own runs: count, don't walk.
        for v in set(before):
            if v is None or v is run:
                continue
            if type(v) is _Shared or v.endpoint is not endpoint:
                shared = True
                continue
            c = before.count(v)
            held += c
            v.live -= c
            if not v.live:
                lru.unlink(v)
        if not shared:
            return held
        for h, v in zip(run.hashes, before, strict=True):
            if v is None or v is run:
                continue
            if type(v) is _Shared:
                prev = v.get(endpoint)
                v[endpoint] = run
                holders[h] = v
                if prev is not None:
                    held += 1
                    prev.live -= 1
                    if not prev.live:
                        lru.unlink(prev)
            elif v.endpoint is not endpoint:
                holders[h] = _Shared({v.endpoint: v, endpoint: run})
        return held

    def _evict(self, lru: _EndpointLRU, excess: int) -> None:
        while excess > 0:
            run = lru.end.next
            hi = run.hi
            k = min(excess, hi)  # oldest first: the run's trailing positions
            run.hi = hi - k
            freed = self._drop(run, run.hashes[hi - k:hi])
            run.live -= freed
            lru.size -= freed
            excess -= freed
            if not run.live:
                lru.unlink(run)

    def _drop(self, run: _Run, hashes: tuple[int, ...]) -> int:
        """Remove `run`'s endpoint from the holders of those of `hashes` it holds through
        `run` (the rest are holes); returns how many it held."""
        holders = self._holders
        popped = list(map(holders.pop, hashes, repeat(None)))
        n = len(popped)
        if popped.count(run) == n:  # the usual case: all live, held by this endpoint only
            return n
        endpoint = run.endpoint
        freed = 0
        for h, v in zip(hashes, popped, strict=True):
            if v is run:
                freed += 1
            elif v is None:
                continue
            elif type(v) is _Shared and v.get(endpoint) is run:
                freed += 1
                del v[endpoint]
                holders[h] = next(iter(v.values())) if len(v) == 1 else v
            else:  # a hole: held by a newer run or by other endpoints only
                holders[h] = v
        return freed

    def purge(self, endpoint: Endpoint) -> None:
        lru = self._lrus.pop(endpoint, None)
        if lru is None:
            return
        for run in lru:
            self._drop(run, run.hashes[:run.hi])
