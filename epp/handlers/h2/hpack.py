"""HPACK (RFC 7541) for the native gRPC transport: a full decoder (static + dynamic table,
Huffman) so every header block keeps the connection's table in sync and the :path can be
checked, and a literal-only encoder (never indexes, so the peer's table is never touched).

Every input is hostile: decoding is linear in the block, and everything the decoder holds
(dynamic table, decoded header list, caches) has a bound named where it is defined.
"""

from __future__ import annotations

from collections import deque


class HpackError(Exception):
    """A malformed header block: a connection error (COMPRESSION_ERROR) in HTTP/2."""


# What the server advertises as SETTINGS_MAX_HEADER_LIST_SIZE, counted as RFC 9113 6.5.2 does
# (name + value + 32 octets per field). Also stops amplification: one byte indexing a 4 KiB
# table entry would otherwise expand 256 KiB of block into 1 GiB of header list.
MAX_HEADER_LIST_SIZE = 256 * 1024
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 6.5.2)
ENTRY_OVERHEAD = 32  # RFC 7541 4.1
# Prefix integers (RFC 7541 5.1): at most 4 continuation octets (values below 2**28 + 127),
# plenty for any length or index a bounded block can hold; more is refused, not accumulated.
_MAX_INTEGER_OCTETS = 4
# Caches of decoded results, bounded in bytes: short Huffman strings (Envoy repeats the same
# values per stream) and short blocks that leave the table untouched (all-indexed requests).
_HUFFMAN_CACHE_KEY_MAX = 128  # raw octets; a cached string decodes to at most 8/5 of that
_HUFFMAN_CACHE_ENTRIES = 256  # so at most 32 KiB of keys + 52 KiB of values
_BLOCK_CACHE_KEY_MAX = 1024  # octets; literals in it decode to at most 8/5 of that
_BLOCK_CACHE_ENTRIES = 64  # so at most 64 KiB of keys + 104 KiB of literals (indexed fields are shared)


STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)
_STATIC_NAME_INDEX = {}
for _i, (_name, _) in enumerate(STATIC_TABLE, 1):
    _STATIC_NAME_INDEX.setdefault(_name, _i)

# RFC 7541 Appendix B: the code and bit length of each symbol (256 = EOS). Canonical.
HUFFMAN_CODES = (
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7, 0xfffffe8, 0xffffea,
    0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed, 0xfffffee, 0xfffffef,
    0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3, 0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7,
    0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb, 0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa,
    0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18, 0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x5c,
    0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc, 0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66,
    0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0,
    0x1ffc, 0x3ffc, 0x22, 0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26, 0x27, 0x6, 0x74, 0x75, 0x28, 0x29,
    0x2a, 0x7, 0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78, 0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd,
    0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda,
    0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf, 0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0,
    0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3, 0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6,
    0x7fffe7, 0xffffef, 0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde,
    0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1,
    0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4,
    0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1, 0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2,
    0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1,
    0x1ffffed, 0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2, 0x1fffe4,
    0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed,
    0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3, 0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4,
    0xfffff5, 0x3ffffea, 0x7ffff4, 0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8,
    0x7ffffe9, 0x7ffffea, 0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0,
    0x3ffffee, 0x3fffffff,
)
HUFFMAN_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28,
    28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6,
    7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13,
    19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11,
    14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23,
    23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21,
    21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26,
    27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22,
    21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27,
    26, 30,
)

# Huffman decoding as a byte-at-a-time state machine (the approach of nghttp2 and the hpack
# library): one table lookup per input octet, so time is linear in the string. A state is an
# internal node of the code tree (256 of them, root 0) or _FAIL, entered on the EOS symbol and
# never left, so the loop needs no per-octet check. States are stored pre-shifted by 8 so the
# table index is `state | octet`.
def _code_tree() -> list[int]:
    """child[2 * node + bit]: an internal node id (> 0) or ~symbol for a leaf."""
    child = [0] * 512
    nodes = 1
    for sym, (code, length) in enumerate(zip(HUFFMAN_CODES, HUFFMAN_LENGTHS, strict=True)):
        node = 0
        for k in range(length - 1, 0, -1):
            slot = 2 * node + ((code >> k) & 1)
            if not child[slot]:
                child[slot] = nodes
                nodes += 1
            node = child[slot]
        child[2 * node + (code & 1)] = ~sym
    assert nodes == 256  # a complete prefix code of 257 symbols has 256 internal nodes
    return child


_FAIL = 256


def _nibble_table(child: list[int]) -> list[tuple[int, bytes]]:
    """(state << 4 | nibble) -> (next state, symbols completed): the cheap half of the build."""
    table: list[tuple[int, bytes]] = []
    for state in range(_FAIL + 1):
        for nibble in range(16):
            node, out = state, bytearray()
            for k in (3, 2, 1, 0):
                if node == _FAIL:
                    break
                c = child[2 * node + ((nibble >> k) & 1)]
                if c >= 0:
                    node = c
                elif ~c == 256:  # EOS inside a string is an error (RFC 7541 5.2)
                    node = _FAIL
                else:
                    out.append(~c)
                    node = 0
            table.append((node, bytes(out)))
    return table


def _octet_tables(child: list[int]) -> tuple[list[int], list[bytes]]:
    """Two nibble steps composed into one octet step (~30 ms at import, ~2 MB)."""
    nib = _nibble_table(child)
    shifted = [s << 8 for s in range(_FAIL + 1)]
    interned: dict[bytes, bytes] = {}
    nxt: list[int] = []
    emit: list[bytes] = []
    for state in range(_FAIL + 1):
        for hi in range(16):
            mid, first = nib[state << 4 | hi]
            for lo in range(16):
                end, second = nib[mid << 4 | lo]
                nxt.append(shifted[end])
                both = first + second
                emit.append(interned.setdefault(both, both))
    return nxt, emit


def _accepting(child: list[int]) -> frozenset[int]:
    """Where a string may end: the root, or up to 7 one-bits into a code (padding, RFC 7541 5.2)."""
    states, node = {0}, 0
    for _ in range(7):
        node = child[2 * node + 1]
        states.add(node << 8)
    return frozenset(states)


_TREE = _code_tree()
_NEXT, _EMIT = _octet_tables(_TREE)
_ACCEPT = _accepting(_TREE)
del _TREE


def huffman_decode(data: bytes) -> bytes:
    nxt, emit = _NEXT, _EMIT
    out = bytearray()  # not a list of parts: that costs 8 octets per input octet, and cache misses
    state = 0
    for octet in data:
        i = state | octet
        state = nxt[i]
        out += emit[i]
    if state not in _ACCEPT:
        if state == _FAIL << 8:
            raise HpackError("EOS symbol in a Huffman string")
        raise HpackError("invalid Huffman padding (over 7 bits, or not all ones)")
    return bytes(out)


def huffman_encode(data: bytes) -> bytes:
    """Linear: a few bits are carried between octets, never the whole string in one integer."""
    codes, lengths = HUFFMAN_CODES, HUFFMAN_LENGTHS
    out = bytearray()
    acc = nbits = 0
    for b in data:
        acc = (acc << lengths[b]) | codes[b]
        nbits += lengths[b]
        while nbits >= 8:
            nbits -= 8
            out.append((acc >> nbits) & 0xFF)
        acc &= (1 << nbits) - 1
    if nbits:  # pad with the most significant bits of EOS (all ones)
        out.append((acc << (8 - nbits) | (0xFF >> nbits)) & 0xFF)
    return bytes(out)


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    for shift in range(0, 7 * _MAX_INTEGER_OCTETS, 7):
        if pos >= len(block):
            raise HpackError("truncated integer")
        b = block[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
    raise HpackError(f"integer longer than {_MAX_INTEGER_OCTETS} continuation octets")


class Decoder:
    """One connection's request-header decoder. Strings are latin-1 (bytes 1:1).

    max_table_size is our SETTINGS_HEADER_TABLE_SIZE (the encoder may not ask for more);
    max_header_list_size bounds one decoded block (name + value + 32 per field).
    """

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE, *,
                 max_header_list_size: int = MAX_HEADER_LIST_SIZE) -> None:
        self.limit = max_table_size
        self.max_size = max_table_size  # the encoder's current choice, <= limit
        self.max_header_list_size = max_header_list_size
        self.size = 0
        self.table: deque[tuple[str, str]] = deque()  # newest first: index 62 is table[0]
        self._huffman_cache: dict[bytes, str] = {}
        # Whole blocks that left the table untouched decode the same until the table changes:
        # a client's repeated request headers (all indexed) cost one lookup.
        self._block_cache: dict[bytes, tuple[tuple[str, str], ...]] = {}

    def _evict(self, max_size: int) -> None:
        """Drop the oldest entries until the table fits (RFC 7541 4.3, 4.4)."""
        table = self.table
        while table and self.size > max_size:
            name, value = table.pop()
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD

    def _add(self, name: str, value: str) -> None:
        self._block_cache.clear()
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self.max_size:  # not an error: the table just empties (RFC 7541 4.4)
            self._evict(0)
            return
        self._evict(self.max_size - size)
        self.table.appendleft((name, value))
        self.size += size

    def _resize(self, size: int) -> None:
        if size > self.limit:
            raise HpackError(f"table size update {size} over the limit {self.limit}")
        self._block_cache.clear()
        self.max_size = size
        self._evict(size)

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        i = index - len(STATIC_TABLE) - 1
        if index <= 0 or i >= len(self.table):
            raise HpackError(f"header index {index} out of range")
        return self.table[i]

    def _string(self, block: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(block):
            raise HpackError("truncated string")
        huffman = block[pos] & 0x80
        length, pos = _integer(block, pos, 7)
        end = pos + length
        if end > len(block):
            raise HpackError(f"string of {length} octets overruns the block")
        raw = block[pos:end]
        if not huffman:
            return raw.decode("latin-1"), end
        if length > _HUFFMAN_CACHE_KEY_MAX:
            return huffman_decode(raw).decode("latin-1"), end
        cache = self._huffman_cache
        s = cache.get(raw)
        if s is None:
            s = huffman_decode(raw).decode("latin-1")
            if len(cache) >= _HUFFMAN_CACHE_ENTRIES:
                cache.clear()
            cache[raw] = s
        return s, end

    def decode(self, block: bytes | bytearray | memoryview) -> list[tuple[str, str]]:
        if not isinstance(block, bytes):  # a view of a receive buffer: hashable, sliceable to str
            block = bytes(block)
        cached = self._block_cache.get(block)
        if cached is not None:
            return list(cached)
        out: list[tuple[str, str]] = []
        room = self.max_header_list_size
        pos, n = 0, len(block)
        mutated = False
        while pos < n:
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                field = self._entry(index)
            elif b & 0xE0 == 0x20:  # dynamic table size update: only ahead of the fields (RFC 7541 4.2)
                if out:
                    raise HpackError("table size update after a header field")
                size, pos = _integer(block, pos, 5)
                self._resize(size)
                mutated = True
                continue
            else:  # literal: with incremental indexing (01), without (0000) or never indexed (0001)
                indexing = b & 0xC0 == 0x40
                index, pos = _integer(block, pos, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                field = (name, value)
                if indexing:
                    self._add(name, value)
                    mutated = True
            room -= len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if room < 0:
                raise HpackError(f"header list over {self.max_header_list_size} octets")
            out.append(field)
        if not mutated and n <= _BLOCK_CACHE_KEY_MAX:
            cache = self._block_cache
            if len(cache) >= _BLOCK_CACHE_ENTRIES:
                cache.clear()
            cache[block] = tuple(out)
        return out


def encode_integer(value: int, prefix: int, first: int = 0) -> bytes:
    """RFC 7541 5.1: `value` on a `prefix`-bit prefix, the first octet's other bits from `first`."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_literal(name: str, value: str | bytes) -> bytes:
    """A literal header field without indexing (name from the static table when it is there)."""
    v = value.encode("latin-1") if isinstance(value, str) else value
    index = _STATIC_NAME_INDEX.get(name, 0)
    if index:
        head = encode_integer(index, 4, 0x00)
    else:
        n = name.encode("latin-1")
        head = b"\x00" + encode_integer(len(n), 7, 0x00) + n
    return head + encode_integer(len(v), 7, 0x00) + v
