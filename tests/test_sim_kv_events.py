"""KV events from a real ZMQ PUB socket decode to the blocks the engine stored and evicted."""

from __future__ import annotations

import random
import time

import msgpack
import zmq

from devstack.launch import free_port
from simulator import (
    AllBlocksCleared,
    Engine,
    EngineConfig,
    EngineLoop,
    EngineRequest,
    VirtualClock,
    block_hashes,
)
from simulator.kv_events import ZmqKVPublisher, decode_batch, encode_batch, encode_event


def test_wire_format_of_each_event_type():
    from simulator import BlockRemoved, BlockStored
    stored = BlockStored([11, 12], None, list(range(32)), 16, None)
    assert encode_event(stored) == ["BlockStored", [11, 12], None, list(range(32)), 16, None, "GPU"]
    assert encode_event(BlockRemoved([12])) == ["BlockRemoved", [12], "GPU"]
    assert encode_event(AllBlocksCleared()) == ["AllBlocksCleared"]
    ts, events = decode_batch(encode_batch([stored], ts=1.5))
    assert ts == 1.5 and events[0][1] == [11, 12]
    assert msgpack.unpackb(encode_batch([BlockStored([2**64 - 1], 2**63, [1] * 16, 16)]))[1][0][1] == [2**64 - 1]


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
            for ev in msgpack.unpackb(frames[2])[1]:
                (stored if ev[0] == "BlockStored" else removed).append(ev)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert [h for e in stored for h in e[1]] == [h for p in prompts for h in block_hashes(p, 16)]
        for e, p in zip(stored, prompts, strict=True):
            assert e[3] == p and e[2] is None
        # 12 blocks hold 3 prompts: the 4th evicted the least recently used (the first), tail first
        assert [h for e in removed for h in e[1]] == list(reversed(block_hashes(prompts[0], 16)))
        live = {h for e in stored for h in e[1]} - {h for e in removed for h in e[1]}
        assert live == set(engine._refs)
    finally:
        sub.close()
        pub.close()
