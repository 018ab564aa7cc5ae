"""Prefix blocks and their chained hashes, as the approximate prefix producer cuts them.

Blocks are cut from the UTF-8 bytes of the prompt text (block size in tokens x 4 bytes;
for ASCII that is the reference's 4 characters per token) and chained with xxhash64:
h0 = xxh64(model + cache_salt), h_i = xxh64(block_i || le_uint64(h_{i-1})), so a block's
hash stands for the whole prefix up to it. With `partial` (today's reference, which cuts
token blocks and keeps the last, shorter one) the tail after the whole blocks is one more
block, zero-padded to a whole token of 4 bytes as the reference's estimate packs bytes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import lru_cache
from itertools import islice
from struct import Struct

from xxhash import xxh64_intdigest

CHARS_PER_TOKEN = 4
DEFAULT_MAX_PREFIX_BLOCKS = 2048  # blocks matched per request: the reference's maxPrefixBlocksToMatch default
_LE_U64 = Struct("<Q")

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


def block_hashes(text: str, model: str, salt: str, block_bytes: int, max_blocks: int,
                 partial: bool = False) -> list[int]:
    """Chained hashes of the whole blocks of `text` (and with `partial` its shorter last
    block), at most `max_blocks`."""
    if block_bytes <= 0 or max_blocks <= 0:
        return []
    limit = block_bytes * max_blocks
    # Encoding never yields fewer bytes than characters, so the character cut keeps enough.
    data = text[:limit].encode("utf-8", "surrogatepass")
    n = min(len(data) // block_bytes, max_blocks)
    h = xxh64_intdigest((model + salt).encode("utf-8", "surrogatepass"))
    tail = data[n * block_bytes:] if partial and n < max_blocks else b""
    if tail:  # n < max_blocks: the text was not cut, this is its true end
        tail += bytes(-len(tail) % CHARS_PER_TOKEN)
        whole = _whole_blocks(data, n, block_bytes, h) if n else []
        return [*whole, xxh64_intdigest(tail + _LE_U64.pack(whole[-1] if whole else h))]
    if n == 0:
        return []
    return _whole_blocks(data, n, block_bytes, h)


def _whole_blocks(data: bytes, n: int, block_bytes: int, h: int) -> list[int]:
    """Chained hashes of the first `n` (> 0) whole blocks of `data`, from the seed `h`."""
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
