"""vLLM's KV-cache event wire format, decoded with bounds.

A publisher (vLLM's `ZmqEventPublisher`, vllm/distributed/kv_events.py) sends one ZMQ
multipart message per batch: `[topic, seq, payload]`, where `seq` is an 8-byte
big-endian counter starting at 0 and `payload` is msgpack of `KVEventBatch`. The batch
is a msgspec struct with `array_like=True`: `[ts, events]` or `[ts, events,
data_parallel_rank]` (trailing default omitted). Each event is a msgspec tagged union
in one of two shapes, both accepted here:

- array (vLLM up to 0.23, `array_like=True`): the tag first, then the fields in
  declaration order, trailing defaults omitted:
    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
     medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
     kv_cache_spec_sliding_window]
    ["BlockRemoved", block_hashes, medium, group_idx]
    ["AllBlocksCleared"]
  Older servers stop earlier (no `medium` before vLLM PR 19737, no `lora_name` before
  27577); newer fields past the ones known here are ignored.
- map (vLLM after PR 42892): `{"type": "BlockStored", "block_hashes": ..., ...}`; keys
  are field names, unknown keys are ignored.

A block hash is an int (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES: the digest's low 64 bits,
big-endian) or the raw digest bytes (32 bytes for sha256); both are normalised here to
the same unsigned 64-bit int (the last 8 bytes, big-endian), so one server reads the
same either way. Old servers using Python's hash() sent signed ints: taken mod 2**64.

Everything a publisher sends is untrusted: `decode_batch` and `parse_frames` raise
`WireError` (and nothing else) for anything malformed, oversized or out of range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KVEvent",
    "Limits",
    "WireError",
    "block_hash",
    "decode_batch",
    "parse_frames",
]

_U64 = (1 << 64) - 1


class WireError(ValueError):
    """A message that is not a well-formed, in-bounds vLLM KV-event batch."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one message; anything larger is a WireError, never an allocation."""

    max_payload_bytes: int = 16 << 20  # one batch; a 128k-token prompt stored at once is ~700 KB
    max_events: int = 65_536  # events in one batch
    max_hashes: int = 1 << 17  # block hashes in one event (a 2M-token prompt at block size 16)
    max_tokens: int = 1 << 21  # token ids in one event
    max_block_size: int = 1 << 16  # tokens per engine block
    max_hash_bytes: int = 64  # a bytes block hash (sha256 digests are 32)
    max_str: int = 1024  # medium, LoRA name, tag, kv_cache_spec_kind
    max_topic: int = 1024


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None  # one entry (a tuple or None) per block, as vLLM sends it
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


def parse_frames(frames: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, int, bytes]:
    """(topic, seq, payload) of one multipart message; the payload is not decoded here."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = (bytes(f) for f in frames)
    if len(topic) > limits.max_topic:
        raise WireError(f"topic of {len(topic)} bytes exceeds {limits.max_topic}")
    if len(seq) != 8:
        raise WireError(f"sequence frame of {len(seq)} bytes, expected 8")
    return topic, int.from_bytes(seq, "big"), payload


def decode_batch(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> EventBatch:
    if len(payload) > limits.max_payload_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds {limits.max_payload_bytes}")
    try:
        # Strings and bytes are bounded by the payload only: extra_keys carry client-chosen
        # values (cache_salt), and a long one must not make a whole batch unreadable.
        raw = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True,
            max_str_len=len(payload), max_bin_len=len(payload),
            max_array_len=max(limits.max_events, limits.max_hashes, limits.max_tokens),
            max_map_len=1024, max_ext_len=0,
        )
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, ValueError, ...)
        raise WireError(f"not msgpack: {type(e).__name__}: {e}"[:300]) from None
    return _batch(raw, limits)


def block_hash(value: object, limits: Limits = DEFAULT_LIMITS) -> int:
    """A wire block hash (int or digest bytes) as an unsigned 64-bit int."""
    if isinstance(value, bool):
        raise WireError("block hash is a bool")
    if isinstance(value, int):
        if not -(1 << 63) <= value <= _U64:
            raise WireError("block hash out of 64-bit range")
        return value & _U64
    if isinstance(value, bytes):
        if not 0 < len(value) <= limits.max_hash_bytes:
            raise WireError(f"block hash of {len(value)} bytes")
        return int.from_bytes(value[-8:], "big")
    raise WireError(f"block hash is a {type(value).__name__}")


def _batch(raw: object, limits: Limits) -> EventBatch:
    if isinstance(raw, list):
        if len(raw) not in (2, 3):
            raise WireError(f"batch array of {len(raw)} fields, expected 2 or 3")
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) == 3 else None
    elif isinstance(raw, dict):  # tolerated: a batch encoded without array_like
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    else:
        raise WireError(f"batch is a {type(raw).__name__}, expected an array")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise WireError("batch ts is not a finite number")
    if not isinstance(events, list):
        raise WireError("batch events is not an array")
    if len(events) > limits.max_events:
        raise WireError(f"{len(events)} events exceed {limits.max_events}")
    return EventBatch(float(ts), tuple(_event(e, limits) for e in events),
                      _opt_int(rank, "data_parallel_rank", 0, 1 << 16))


_STORED = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
           "lora_name", "extra_keys", "group_idx")
_REMOVED = ("block_hashes", "medium", "group_idx")


def _fields(raw: object, limits: Limits) -> tuple[str, dict[str, Any]]:
    """Tag and named fields of an event in either shape."""
    if isinstance(raw, list):
        if not raw:
            raise WireError("event array is empty")
        tag = raw[0]
        names = _STORED if tag == "BlockStored" else _REMOVED if tag == "BlockRemoved" else ()
        values = dict(zip(names, raw[1:], strict=False))
    elif isinstance(raw, dict):
        tag, values = raw.get("type"), raw
    else:
        raise WireError(f"event is a {type(raw).__name__}")
    if not isinstance(tag, str):
        raise WireError("event tag is not a string")
    return _string(tag, "tag", limits), values


def _event(raw: object, limits: Limits) -> KVEvent:
    tag, f = _fields(raw, limits)
    if tag == "BlockStored":
        for name in ("block_hashes", "parent_block_hash", "token_ids", "block_size"):
            if name not in f:
                raise WireError(f"BlockStored without {name}")
        hashes = _hashes(f["block_hashes"], limits)
        parent = f["parent_block_hash"]
        return BlockStored(
            block_hashes=hashes,
            parent_block_hash=None if parent is None else block_hash(parent, limits),
            token_ids=_tokens(f["token_ids"], limits),
            block_size=_int(f["block_size"], "block_size", 1, limits.max_block_size),
            lora_id=_opt_int(f.get("lora_id"), "lora_id", -(1 << 63), _U64),
            medium=_opt_str(f.get("medium"), "medium", limits),
            lora_name=_opt_str(f.get("lora_name"), "lora_name", limits),
            extra_keys=_extra_keys(f.get("extra_keys"), len(hashes)),
            group_idx=_opt_int(f.get("group_idx"), "group_idx", 0, 1 << 16),
        )
    if tag == "BlockRemoved":
        if "block_hashes" not in f:
            raise WireError("BlockRemoved without block_hashes")
        return BlockRemoved(_hashes(f["block_hashes"], limits), _opt_str(f.get("medium"), "medium", limits),
                            _opt_int(f.get("group_idx"), "group_idx", 0, 1 << 16))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise WireError(f"unknown event tag {tag[:64]!r}")


def _hashes(raw: object, limits: Limits) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise WireError("block_hashes is not an array")
    if len(raw) > limits.max_hashes:
        raise WireError(f"{len(raw)} block hashes exceed {limits.max_hashes}")
    if raw and set(map(type, raw)) == {int} and min(raw) >= 0 and max(raw) <= _U64:
        return tuple(raw)  # the common case, checked in C
    return tuple(block_hash(h, limits) for h in raw)


def _tokens(raw: object, limits: Limits) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise WireError("token_ids is not an array")
    if len(raw) > limits.max_tokens:
        raise WireError(f"{len(raw)} token ids exceed {limits.max_tokens}")
    # C-level passes (map, min, max) instead of a Python loop: token lists are the bulk of a batch
    if raw and (set(map(type, raw)) != {int} or min(raw) < 0 or max(raw) > 0xFFFFFFFF):
        raise WireError("token id is not an unsigned 32-bit int")
    return tuple(raw)


def _extra_keys(raw: object, n_blocks: int) -> tuple[Any, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > n_blocks:
        raise WireError("extra_keys is not an array of at most one entry per block")
    for entry in raw:
        if entry is not None and not isinstance(entry, list):
            raise WireError("extra_keys entry is neither null nor an array")
    return tuple(None if e is None else tuple(e) for e in raw)


def _int(raw: object, name: str, lo: int, hi: int) -> int:
    if type(raw) is not int or not lo <= raw <= hi:
        raise WireError(f"{name} is not an int in [{lo}, {hi}]")
    return raw


def _opt_int(raw: object, name: str, lo: int, hi: int) -> int | None:
    return None if raw is None else _int(raw, name, lo, hi)


def _string(raw: str, name: str, limits: Limits) -> str:
    if len(raw) > limits.max_str:
        raise WireError(f"{name} longer than {limits.max_str}")
    return raw


def _opt_str(raw: object, name: str, limits: Limits) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise WireError(f"{name} is not a string")
    return _string(raw, name, limits)
