"""Block keys: the picker's own chained hash of token ids, shared by prompts and events.

A model server's block hashes depend on its hash function and seed (vLLM:
`hash_block_tokens(hash_fn, parent, token_ids, extra_keys)` in
vllm/v1/core/kv_cache_utils.py, chained from NONE_HASH, which is random per process
unless PYTHONHASHSEED is set). The picker cannot reproduce them, so, as llm-d-kv-cache
does (pkg/kvcache/kvblock/token_processor.go), it computes its own key for every block
from the token ids, on both sides: from a request's prompt at lookup, and from the
`token_ids` of each BlockStored event at intake. The server's hashes are kept only as
opaque names, to map a later BlockRemoved (or a child's `parent_block_hash`) back to
the picker's key. Requests and events meet whatever the server's seed.

The chain, for block size B (`blockSizeTokens`), seed S (`hashSeed`) and model name M
(the LoRA adapter's name when the event or request names one, else the base model):

    root    = H0(S, M)
    key[0]  = H(root,     tokens[0:B],    extra[0])
    key[i]  = H(key[i-1], tokens[iB:(i+1)B], extra[i])

Only full blocks get keys. `extra[i]` is None for plain text; anything else (cache salt,
multimodal identifiers from vLLM's `extra_keys`) taints the key so a prompt without the
same extras never matches it. Two hash functions:

- "fnv64a-cbor", llm-d-kv-cache's exactly: H0 = FNV-1a-64(CBOR([FNV-1a-64(S), null, M])),
  H(p, t, e) = FNV-1a-64(canonical CBOR of the array [p, t, e]) with p an unsigned int,
  t an array of unsigned ints, e null (our CBOR of the extras otherwise: llm-d encodes
  multimodal hashes its own way, so only text keys are byte-identical). Pure Python here:
  about 15 us per 16-token block (bench/kvindex_cost.py), so for interoperability, not
  the hot path.
- "xxh3-64" (default): the same chain with H0 = xxh3_64(M, seed=xxh3_64(S)) and
  H(p, t, e) = xxh3_64(t as little-endian uint32 || CBOR(e) if e is not None, seed=p);
  under 1 us per 16-token block.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

import xxhash

__all__ = ["ALGORITHMS", "BlockKeyer", "cbor", "fnv1a64"]

ALGORITHMS = ("xxh3-64", "fnv64a-cbor")

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_U64 = (1 << 64) - 1
_MAX_DEPTH = 16
_CONVERT_BLOCKS = 16  # blocks of token ids converted to bytes at a time


def fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _U64
    return h


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


def cbor(value: Any, _depth: int = 0) -> bytes:
    """Canonical CBOR (RFC 8949 4.2.1: shortest heads, definite lengths, sorted map keys)
    of the values msgpack can carry. Integers must fit 64 bits."""
    if _depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None:
        return b"\xf6"
    if value is True:
        return b"\xf5"
    if value is False:
        return b"\xf4"
    if isinstance(value, int):
        if not -(1 << 64) <= value <= _U64:
            raise ValueError("integer outside 64 bits")
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, float):
        return b"\xfb" + struct.pack(">d", value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return _head(2, len(data)) + data
    if isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        return _head(3, len(data)) + data
    if isinstance(value, list | tuple):
        return _head(4, len(value)) + b"".join(cbor(v, _depth + 1) for v in value)
    if isinstance(value, dict):
        items = [(cbor(k, _depth + 1), cbor(v, _depth + 1)) for k, v in value.items()]
        items.sort(key=lambda kv: (len(kv[0]), kv[0]))  # RFC 7049 canonical: shorter keys first
        return _head(5, len(items)) + b"".join(k + v for k, v in items)
    raise ValueError(f"cannot encode a {type(value).__name__}")


def _cbor_uints(tokens: Sequence[int]) -> bytes:
    return _head(4, len(tokens)) + b"".join(_head(0, t) for t in tokens)


class BlockKeyer:
    """Keys of the full blocks of a token sequence (see the module docstring)."""

    __slots__ = ("algorithm", "block_size", "hash_seed", "_init", "_roots")

    _MAX_ROOTS = 4096  # model/adapter names remembered; the root is cheap to recompute

    def __init__(self, block_size: int = 16, hash_seed: str = "", algorithm: str = "xxh3-64") -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"blockSizeTokens must be a positive integer, got {block_size!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown block-key algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.algorithm = algorithm
        seed = hash_seed.encode()
        self._init = fnv1a64(seed) if algorithm == "fnv64a-cbor" else xxhash.xxh3_64_intdigest(seed)
        self._roots: dict[str, int] = {}

    def root(self, model: str) -> int:
        key = self._roots.get(model)
        if key is None:
            if self.algorithm == "fnv64a-cbor":
                key = fnv1a64(b"\x83" + _head(0, self._init) + b"\xf6" + cbor(model))
            else:
                key = xxhash.xxh3_64_intdigest(model.encode("utf-8", "surrogatepass"), seed=self._init)
            if len(self._roots) >= self._MAX_ROOTS:
                self._roots.clear()
            self._roots[model] = key
        return key

    def iter_keys(self, token_ids: Sequence[int], model: str = "", parent: int | None = None,
                  extras: Sequence[Any] | None = None) -> Iterator[int]:
        """Keys of the full blocks, lazily (a lookup stops at the first miss). `parent`
        continues a chain from that key instead of the model's root; `extras`, if
        given, has one entry per full block (None for none)."""
        bs = self.block_size
        n = len(token_ids) // bs
        if extras is not None and len(extras) < n:
            raise ValueError("extras must have one entry per full block")
        prev = self.root(model) if parent is None else parent
        if self.algorithm == "fnv64a-cbor":
            for i in range(n):
                extra = None if extras is None else extras[i]
                prev = fnv1a64(b"\x83" + _head(0, prev) + _cbor_uints(token_ids[i * bs:(i + 1) * bs])
                               + (b"\xf6" if extra is None else cbor(extra)))
                yield prev
            return
        width = 4 * bs
        digest = xxhash.xxh3_64_intdigest
        for first in range(0, n, _CONVERT_BLOCKS):  # converted piecewise: a miss stops early
            last = min(n, first + _CONVERT_BLOCKS)
            data = _u32le(token_ids[first * bs:last * bs])
            for i in range(first, last):
                chunk = data[(i - first) * width:(i - first + 1) * width]
                if extras is not None and extras[i] is not None:
                    chunk = bytes(chunk) + cbor(extras[i])
                prev = digest(chunk, seed=prev)
                yield prev

    def keys(self, token_ids: Sequence[int], model: str = "", parent: int | None = None,
             extras: Sequence[Any] | None = None) -> list[int]:
        return list(self.iter_keys(token_ids, model, parent, extras))


def _u32le(token_ids: Sequence[int]) -> memoryview:
    try:
        arr = array("I", token_ids)  # 4-byte items on every platform CPython supports
    except OverflowError:
        raise ValueError("token id outside unsigned 32 bits") from None
    if sys.byteorder == "big":
        arr.byteswap()
    return memoryview(arr).cast("B")
