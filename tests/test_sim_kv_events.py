"""KV events from a real ZMQ PUB socket decode to the blocks the engine stored and evicted."""

from __future__ import annotations

import random
import time

import msgpack
import zmq

from devstack.launch import free_port
from simulator import (
    AllBlocksCleared,
    BlockRemoved,
    Engine,
    EngineConfig,
    EngineLoop,
    EngineRequest,
    VirtualClock,
    block_hashes,
)
from simulator.kv_events import ZmqKVPublisher, decode_batch, encode_batch, encode_event


def test_wire_format_of_each_event_type():
    from simulator import BlockStored
    stored = BlockStored([11, 12], None, list(range(32)), 16, None, extra_keys=[None, None])
    # today's vLLM: msgspec maps in declaration order, tag "type", defaults omitted, fields
    # without a default (lora_id, medium, lora_name) always present
    assert encode_event(stored) == {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None,
                                    "token_ids": list(range(32)), "block_size": 16, "lora_id": None,
                                    "medium": "GPU", "lora_name": None, "extra_keys": [None, None],
                                    "group_idx": 0}
    assert encode_event(BlockRemoved([12])) == {"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU",
                                                "group_idx": 0}
    assert encode_event(AllBlocksCleared()) == {"type": "AllBlocksCleared"}
    assert list(encode_event(stored)) == ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size",
                                          "lora_id", "medium", "lora_name", "extra_keys", "group_idx"]
    # vLLM up to 0.23: array_like, trailing defaults omitted
    assert encode_event(BlockStored([11], None, [1] * 16, 16, None, group_idx=None), "array") == [
        "BlockStored", [11], None, [1] * 16, 16, None, "GPU", None]
    assert encode_event(BlockRemoved([12]), "array") == ["BlockRemoved", [12], "GPU", 0]
    batch = msgpack.unpackb(encode_batch([stored], ts=1.5))
    assert list(batch) == ["ts", "events", "data_parallel_rank"] and batch["data_parallel_rank"] == 0
    ts, events = decode_batch(encode_batch([stored], ts=1.5))
    assert ts == 1.5 and events[0]["block_hashes"] == [11, 12]
    assert decode_batch(encode_batch([stored], ts=2.0, encoding="array"))[1][0][1] == [11, 12]
    assert msgpack.unpackb(encode_batch([BlockStored([2**64 - 1], 2**63, [1] * 16, 16)]))["events"][0][
        "block_hashes"] == [2**64 - 1]


def test_picker_decodes_what_the_simulator_publishes_to_the_same_keys_as_the_prompt():
    """The simulator's events (either encoding, LoRA included) decode with the picker's
    wire.py and index under the keys the picker computes from the prompt's token ids."""
    from epp.datalayer.kvevents import BlockIndex, BlockKeyer
    from epp.datalayer.kvevents import decode_batch as picker_decode

    for encoding in ("map", "array"):
        for lora in (None, "sql-lora"):
            got = []
            engine = Engine(EngineConfig(num_gpu_blocks=64), on_kv_events=got.extend)
            clock = VirtualClock()
            loop = EngineLoop(engine, clock)
            prompt = list(range(100, 100 + 16 * 5 + 3))
            loop.submit(EngineRequest("r", prompt, 1, lora=lora))
            clock.run_until_idle()
            index = BlockIndex(BlockKeyer(16))
            index.apply("e", picker_decode(encode_batch(got, encoding=encoding)).events, "m")
            assert index.match(prompt, lora or "m")["e"].gpu_blocks == 5
            assert index.match(prompt, "other") == {}


def test_replay_router_serves_buffered_batches_as_vllm():
    port, replay = free_port(), free_port()
    pub = ZmqKVPublisher(f"tcp://127.0.0.1:{port}", "kv@x@m", replay_endpoint=f"tcp://127.0.0.1:{replay}")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{replay}")
    try:
        for i in range(4):
            pub.publish([BlockRemoved([i])])
        dealer.send_multipart([b"", (2).to_bytes(8, "big")])
        got = []
        while True:
            assert dealer.poll(5000), "no replay answer"
            frames = dealer.recv_multipart()
            if frames[2:] == [b""] and frames[1] == (-1).to_bytes(8, "big", signed=True):
                break
            got.append((int.from_bytes(frames[1], "big"), decode_batch(frames[2])[1][0]["block_hashes"]))
        assert got == [(2, [2]), (3, [3])]
    finally:
        dealer.close()
        pub.close()


def test_subscriber_sees_stores_and_lru_evictions():
    port = free_port()
    topic = "kv@127.0.0.1:8000@m"
    pub = ZmqKVPublisher(f"tcp://127.0.0.1:{port}", topic)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sub.connect(f"tcp://127.0.0.1:{port}")
    try:
        # PUB/SUB joins asynchronously: publish a marker until one arrives, then drain.
        deadline = time.monotonic() + 10
        while not sub.poll(100):
            assert time.monotonic() < deadline, "subscriber never joined"
            pub.publish([AllBlocksCleared()])
        while sub.poll(100):
            sub.recv_multipart()

        clock = VirtualClock()
        engine = Engine(EngineConfig(num_gpu_blocks=12), on_kv_events=pub.publish)
        loop = EngineLoop(engine, clock)
        rng = random.Random(3)
        prompts = [[rng.randrange(50_000) for _ in range(64)] for _ in range(4)]  # 4 blocks each
        for i, p in enumerate(prompts):
            loop.submit(EngineRequest(f"r{i}", p, 1))
            clock.run_until_idle()

        seqs, stored, removed = [], [], []
        while sub.poll(500):
            frames = sub.recv_multipart()
            assert frames[0] == topic.encode()
            seqs.append(int.from_bytes(frames[1], "big"))
            for ev in decode_batch(frames[2])[1]:
                (stored if ev["type"] == "BlockStored" else removed).append(ev)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert [h for e in stored for h in e["block_hashes"]] == [h for p in prompts for h in block_hashes(p, 16)]
        for e, p in zip(stored, prompts, strict=True):
            assert e["token_ids"] == p and e["parent_block_hash"] is None
        # 12 blocks hold 3 prompts: the 4th evicted the least recently used (the first), tail first
        assert [h for e in removed for h in e["block_hashes"]] == list(reversed(block_hashes(prompts[0], 16)))
        live = {h for e in stored for h in e["block_hashes"]} - {h for e in removed for h in e["block_hashes"]}
        assert live == set(engine._refs)
    finally:
        sub.close()
        pub.close()
