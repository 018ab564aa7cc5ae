"""Decoding vLLM's KV-event batches: differential against msgspec structs shaped as vLLM
declares them (array and map encodings, old and new field sets), the project's simulator,
hand-built msgpack, and hostile input that must raise WireError and nothing else."""

from __future__ import annotations

import math

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.datalayer.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Limits,
    WireError,
    decode_batch,
    parse_frames,
)
from epp.datalayer.kvevents.wire import block_hash

# --- vLLM's structs (vllm/distributed/kv_events.py), declared here as vLLM declares them ---

ExternalBlockHash = bytes | int


class ArrayBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # after vLLM PR 42892
    pass


def _stored_fields():
    return {
        "__annotations__": {
            "block_hashes": list[ExternalBlockHash], "parent_block_hash": ExternalBlockHash | None,
            "token_ids": list[int], "block_size": int, "lora_id": int | None, "medium": str | None,
            "lora_name": str | None, "extra_keys": list[tuple | None] | None, "group_idx": int | None,
            "kv_cache_spec_kind": str | None, "kv_cache_spec_sliding_window": int | None,
        },
        "extra_keys": None, "group_idx": None, "kv_cache_spec_kind": None, "kv_cache_spec_sliding_window": None,
    }


def _removed_fields():
    return {"__annotations__": {"block_hashes": list[ExternalBlockHash], "medium": str | None,
                                "group_idx": int | None}, "group_idx": None}


ArrayStored = type("BlockStored", (ArrayEvent,), _stored_fields())
ArrayRemoved = type("BlockRemoved", (ArrayEvent,), _removed_fields())
ArrayCleared = type("AllBlocksCleared", (ArrayEvent,), {})
MapStored = type("BlockStored", (MapEvent,), _stored_fields())
MapRemoved = type("BlockRemoved", (MapEvent,), _removed_fields())
MapCleared = type("AllBlocksCleared", (MapEvent,), {})


class V09Stored(ArrayEvent, tag="BlockStored"):  # vLLM 0.9: before medium and lora_name
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class V09Removed(ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int]


ENCODER = msgspec.msgpack.Encoder()

# --- strategies -----------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
wire_hash = st.one_of(u64, st.binary(min_size=32, max_size=32))
name = st.one_of(st.none(), st.text(max_size=20))


@st.composite
def stored_args(draw):
    hashes = draw(st.lists(wire_hash, max_size=4))
    bs = draw(st.integers(1, 8))
    return dict(block_hashes=hashes, parent_block_hash=draw(st.one_of(st.none(), wire_hash)),
                token_ids=draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(hashes) * bs,
                                        max_size=len(hashes) * bs)),
                block_size=bs, lora_id=draw(st.one_of(st.none(), st.integers(0, 2**31))),
                medium=draw(st.sampled_from([None, "GPU", "CPU"])), lora_name=draw(name),
                extra_keys=draw(st.one_of(st.none(), st.just([("lora-a",)] * len(hashes)))),
                group_idx=draw(st.one_of(st.none(), st.integers(0, 3))))


def expected_stored(a: dict) -> BlockStored:
    return BlockStored(tuple(block_hash(h) for h in a["block_hashes"]),
                       None if a["parent_block_hash"] is None else block_hash(a["parent_block_hash"]),
                       tuple(a["token_ids"]), a["block_size"], a["lora_id"], a["medium"], a["lora_name"],
                       None if a["extra_keys"] is None else tuple(a["extra_keys"]), a["group_idx"])


events_args = st.lists(st.one_of(
    stored_args().map(lambda a: ("stored", a)),
    st.tuples(st.lists(wire_hash, max_size=4), st.sampled_from([None, "GPU", "CPU"])).map(lambda t: ("removed", t)),
    st.just(("cleared", None))), max_size=6)


def vllm_payload(events, shape: str, ts: float, rank: int | None) -> tuple[bytes, EventBatch]:
    structs, want = [], []
    stored, removed, cleared = (MapStored, MapRemoved, MapCleared) if shape == "map" else \
        (ArrayStored, ArrayRemoved, ArrayCleared)
    for kind, a in events:
        if kind == "stored":
            structs.append(stored(**a))
            want.append(expected_stored(a))
        elif kind == "removed":
            structs.append(removed(block_hashes=a[0], medium=a[1]))
            want.append(BlockRemoved(tuple(block_hash(h) for h in a[0]), a[1]))
        else:
            structs.append(cleared())
            want.append(AllBlocksCleared())
    return ENCODER.encode(ArrayBatch(ts, structs, rank)), EventBatch(ts, tuple(want), rank)


@settings(max_examples=150, deadline=None)
@given(events_args, st.sampled_from(["array", "map"]), st.floats(0, 2e9), st.one_of(st.none(), st.integers(0, 7)))
def test_decodes_what_vllms_structs_encode(events, shape, ts, rank):
    payload, want = vllm_payload(events, shape, ts, rank)
    assert decode_batch(payload) == want


def test_field_order_of_the_array_shape_is_vllms():
    ev = ArrayStored(block_hashes=[1, b"\x00" * 24 + (7).to_bytes(8, "big")], parent_block_hash=None,
                     token_ids=[5, 6, 7, 8], block_size=2, lora_id=3, medium="CPU", lora_name="ad")
    raw = msgpack.unpackb(ENCODER.encode(ArrayBatch(1.0, [ev])))
    # msgspec writes every field of an array_like struct, defaults included
    assert raw == [1.0, [["BlockStored", [1, b"\x00" * 31 + b"\x07"], None, [5, 6, 7, 8], 2, 3, "CPU", "ad",
                          None, None, None, None]], None]
    got = decode_batch(ENCODER.encode(ArrayBatch(1.0, [ev]))).events[0]
    assert got == BlockStored((1, 7), None, (5, 6, 7, 8), 2, 3, "CPU", "ad")


def test_old_vllm_without_medium_or_lora_name():
    payload = ENCODER.encode(ArrayBatch(2.5, [V09Stored([1, 2], 9, [1] * 32, 16, None), V09Removed([2])]))
    assert decode_batch(payload) == EventBatch(2.5, (BlockStored((1, 2), 9, (1,) * 32, 16), BlockRemoved((2,))))


def test_newer_fields_in_either_shape_are_ignored():
    arr = msgpack.packb([1.0, [["BlockStored", [1], None, [4, 4], 2, None, "GPU", None, None, 0, "full_attention",
                                None, "a-future-field"], ["BlockRemoved", [1], "GPU", 0, "future"]]])
    mp = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                               "token_ids": [4, 4], "block_size": 2, "cache_salt": "x", "session_id": "s"}]])
    assert decode_batch(arr).events == (BlockStored((1,), None, (4, 4), 2, None, "GPU", None, None, 0),
                                        BlockRemoved((1,), "GPU", 0))
    assert decode_batch(mp).events == (BlockStored((1,), None, (4, 4), 2),)


class MapBatch(msgspec.Struct, omit_defaults=True, gc=False):  # tolerated: a batch without array_like
    ts: float
    events: list
    data_parallel_rank: int | None = None


def test_a_map_shaped_batch_and_long_client_chosen_extra_keys():
    salt = "s" * 100_000  # cache_salt comes from the client's request: any length
    ev = MapStored(block_hashes=[1], parent_block_hash=None, token_ids=[3, 4], block_size=2, lora_id=None,
                   medium="GPU", lora_name=None, extra_keys=[(salt, b"\x00" * 300)])
    got = decode_batch(ENCODER.encode(MapBatch(4.0, [ev, MapCleared()], 1)))
    assert got == EventBatch(4.0, (BlockStored((1,), None, (3, 4), 2, None, "GPU", None, ((salt, b"\x00" * 300),)),
                                   AllBlocksCleared()), 1)


def test_block_hash_forms_meet():
    digest = bytes(range(32))
    as_int = int.from_bytes(digest, "big") & (2**64 - 1)  # vLLM's maybe_convert_block_hash
    assert block_hash(digest) == block_hash(as_int) == int.from_bytes(digest[-8:], "big")
    assert block_hash(-1) == 2**64 - 1  # Python hash() values from old servers
    for bad in (True, 2**64, -(2**63) - 1, b"", b"x" * 65, 1.5, "1", None):
        with pytest.raises(WireError):
            block_hash(bad)


def test_the_simulators_encoding_decodes():
    from simulator import AllBlocksCleared as SimCleared
    from simulator import BlockRemoved as SimRemoved
    from simulator import BlockStored as SimStored
    from simulator.kv_events import encode_batch
    payload = encode_batch([SimStored([11, 2**64 - 1], 10, list(range(32)), 16, 4), SimRemoved([11]), SimCleared()],
                           ts=3.0)
    events = (BlockStored((11, 2**64 - 1), 10, tuple(range(32)), 16, 4, "GPU", group_idx=0),
              BlockRemoved((11,), "GPU", 0), AllBlocksCleared())
    assert decode_batch(payload) == EventBatch(3.0, events, 0)  # today's vLLM: maps, data_parallel_rank set
    assert decode_batch(encode_batch([SimStored([11, 2**64 - 1], 10, list(range(32)), 16, 4),
                                                 SimRemoved([11]), SimCleared()], ts=3.0, encoding="array",
                                     data_parallel_rank=None)) == EventBatch(3.0, events)


def test_frames():
    assert parse_frames([b"kv@a@m", (5).to_bytes(8, "big"), b"p"]) == (b"kv@a@m", 5, b"p")
    for frames in ([b"t", b"p"], [b"t", b"\x00" * 7, b"p"], [b"t" * 2000, b"\x00" * 8, b"p"], [b"a"] * 4):
        with pytest.raises(WireError):
            parse_frames(frames)


HOSTILE = [
    b"", b"\xc1", b"\x92", msgpack.packb([1.0, [], 0, 0]), msgpack.packb({"ts": 1.0}), msgpack.packb("x"),
    msgpack.packb([float("nan"), []]), msgpack.packb([float("inf"), []]), msgpack.packb([True, []]),
    msgpack.packb([1.0, {}]), msgpack.packb([1.0, [[]]]), msgpack.packb([1.0, [[7]]]), msgpack.packb([1.0, [["Nope"]]]),
    msgpack.packb([1.0, [["BlockStored", [1], None, [1]]]]),  # no block_size
    msgpack.packb([1.0, [["BlockStored", [1], None, [-1], 1]]]),  # negative token
    msgpack.packb([1.0, [["BlockStored", [1], None, [2**32], 1]]]),  # token beyond 32 bits
    msgpack.packb([1.0, [["BlockStored", [1], None, [True], 1]]]),  # bool token
    msgpack.packb([1.0, [["BlockStored", [1], None, [1], 0]]]),  # block size 0
    msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1.0]]]),  # float block size
    msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1, None, 5]]]),  # medium not a string
    msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1, None, "GPU", None, "not-a-list"]]]),
    msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1, None, "GPU", None, [[1], [2]]]]]),  # 2 extras, 1 block
    msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1, None, "GPU", None, None, -1]]]),  # negative group
    msgpack.packb([1.0, [["BlockRemoved", "x"]]]), msgpack.packb([1.0, [{"type": 5}]]),
    msgpack.packb([1.0, [{"block_hashes": []}]]), msgpack.packb([1.0, [["BlockStored", [1], None, [1], 1, None, "G" * 2000]]]),
    msgpack.packb([1.0, []], use_bin_type=True) + b"trailing",
    msgpack.packb([1.0, [msgpack.ExtType(5, b"")]]), msgpack.packb([1.0, [], 1 << 40]),
    b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion elements
    b"\x91" * 100_000,  # nesting deeper than any stack
    b"\x81\x92\x01\x02\x03",  # an array as a map key
]


@pytest.mark.parametrize("payload", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_payloads_raise_wire_error(payload):
    with pytest.raises(WireError):
        decode_batch(payload)


def test_bounds_are_enforced_before_work():
    small = Limits(max_payload_bytes=100, max_events=2, max_hashes=2, max_tokens=4)
    for payload in (b"\x90" * 101, msgpack.packb([1.0, [["AllBlocksCleared"]] * 3]),
                    msgpack.packb([1.0, [["BlockRemoved", [1, 2, 3]]]]),
                    msgpack.packb([1.0, [["BlockStored", [1], None, [1] * 5, 5]]])):
        with pytest.raises(WireError):
            decode_batch(payload, small)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_wire_error(data):
    try:
        assert isinstance(decode_batch(data), EventBatch)
    except WireError:
        pass


msgpack_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=12),
              st.binary(max_size=40), st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU"])),
    lambda inner: st.one_of(st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values, msgpack_values)
def test_arbitrary_structures_raise_only_wire_error(ts, events):
    for value in ([ts, events], [1.0, events], [1.0, [events]], [1.0, [["BlockStored", events, None, [], 1]]]):
        try:
            batch = decode_batch(msgpack.packb(value))
        except WireError:
            continue
        assert math.isfinite(batch.ts)


@settings(max_examples=200, deadline=None)
@given(events_args, st.integers(0, 10_000), st.integers(0, 255), st.booleans())
def test_corrupted_vllm_payloads_raise_only_wire_error(events, pos, byte, truncate):
    payload, _ = vllm_payload(events, "array", 1.0, None)
    pos %= max(1, len(payload))
    bad = payload[:pos] if truncate else payload[:pos] + bytes((byte,)) + payload[pos + 1:]
    try:
        decode_batch(bad)
    except WireError:
        pass
