"""KV cache events over ZMQ in vLLM's wire format.

Each message has three frames: topic (`kv@<ip>:<port>@<model>`), an 8-byte big-endian
sequence number, and a msgpack payload `[timestamp, [event, ...]]` (vLLM omits the
data_parallel_rank when unset). Events are tagged arrays as vLLM's msgspec structs
encode them:
    ["BlockStored", block_hashes, parent_block_hash|None, token_ids, block_size, lora_id|None, "GPU"]
    ["BlockRemoved", block_hashes, "GPU"]
    ["AllBlocksCleared"]"""

from __future__ import annotations

import time
from collections.abc import Sequence

import msgpack
import zmq

from .engine import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def encode_event(e: KVEvent) -> list:
    if isinstance(e, BlockStored):
        return ["BlockStored", e.block_hashes, e.parent_block_hash, e.token_ids, e.block_size, e.lora_id, e.medium]
    if isinstance(e, BlockRemoved):
        return ["BlockRemoved", e.block_hashes, e.medium]
    if isinstance(e, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV event: {e!r}")


def encode_batch(events: Sequence[KVEvent], ts: float | None = None) -> bytes:
    return msgpack.packb([time.time() if ts is None else ts, [encode_event(e) for e in events]])


def decode_batch(payload: bytes) -> tuple[float, list[list]]:
    """Inverse of encode_batch (for tests and tools)."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    return batch[0], batch[1]


def topic_for(host: str, port: int, model: str) -> str:
    return f"kv@{host}:{port}@{model}"


class ZmqKVPublisher:
    """A PUB socket bound to `endpoint` (e.g. tcp://*:5557). Sends never block: with no
    subscriber or a slow one, ZMQ drops messages, as with vLLM."""

    def __init__(self, endpoint: str, topic: str, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.topic = topic.encode()
        self._socket = (context or zmq.Context.instance()).socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.bind(endpoint)
        self.seq = 0

    def publish(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        try:
            self._socket.send_multipart([self.topic, self.seq.to_bytes(8, "big"), encode_batch(events)],
                                        flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # high-water mark reached: dropped, as a PUB socket does
        self.seq += 1

    def close(self) -> None:
        self._socket.close(linger=0)
