"""KV cache events over ZMQ, as vLLM publishes them (vllm/distributed/kv_events.py).

Each message has three frames: the topic (here `kv@<ip>:<port>@<model>`, the llm-d
guides' kv@<pod>@<model> convention), an 8-byte big-endian sequence number counting
batches from 0, and the msgpack payload of the batch: msgspec structs with
`omit_defaults` and a tagged union (tag field "type"). Today's vLLM encodes them as maps
in declaration order ("map", the default here):

    {"ts": <float>, "events": [...], "data_parallel_rank": <int>}
    {"type": "BlockStored", "block_hashes", "parent_block_hash", "token_ids", "block_size",
     "lora_id", "medium", "lora_name", "extra_keys" (one entry per block), "group_idx"}
    {"type": "BlockRemoved", "block_hashes", "medium", "group_idx"}
    {"type": "AllBlocksCleared"}

Fields without a default (lora_id, medium, lora_name) are always sent, even null; fields
whose value equals their default (None) are left out. vLLM up to 0.23 encoded the same
structs as arrays (`array_like`): the tag first, then the fields in that order ("array").

With a replay endpoint, a ROUTER socket serves the last `buffer_steps` batches as vLLM's
does: a request [identity, b"", start seq] is answered with [identity, b"", seq, payload]
for every buffered batch from `start` on, then [identity, b"", -1 (8 bytes, signed), b""].
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

from .engine import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

ENCODINGS = ("map", "array")
END_SEQ = (-1).to_bytes(8, "big", signed=True)
BUFFER_STEPS = 10_000  # vLLM's default replay buffer (batches)


def encode_event(e: KVEvent, encoding: str = "map") -> Any:
    if isinstance(e, BlockStored):
        fields: list[tuple[str, Any]] = [
            ("block_hashes", e.block_hashes), ("parent_block_hash", e.parent_block_hash),
            ("token_ids", e.token_ids), ("block_size", e.block_size), ("lora_id", e.lora_id),
            ("medium", e.medium), ("lora_name", e.lora_name), ("extra_keys", e.extra_keys),
            ("group_idx", e.group_idx)]
        required = 7  # the fields before extra_keys have no default
    elif isinstance(e, BlockRemoved):
        fields, required = [("block_hashes", e.block_hashes), ("medium", e.medium), ("group_idx", e.group_idx)], 2
    elif isinstance(e, AllBlocksCleared):
        fields, required = [], 0
    else:
        raise TypeError(f"not a KV event: {e!r}")
    tag = type(e).__name__
    if encoding == "map":
        return {"type": tag, **{k: v for i, (k, v) in enumerate(fields) if i < required or v is not None}}
    values = [v for _, v in fields]
    while len(values) > required and values[-1] is None:  # array_like omits trailing defaults
        values.pop()
    return [tag, *values]


def encode_batch(events: Sequence[KVEvent], ts: float | None = None, *, encoding: str = "map",
                 data_parallel_rank: int | None = 0) -> bytes:
    """One KVEventBatch; the publisher sets data_parallel_rank (0 without data parallelism)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown KV-event encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    ts = time.time() if ts is None else ts
    body = [encode_event(e, encoding) for e in events]
    if encoding == "map":
        batch: Any = {"ts": ts, "events": body}
        if data_parallel_rank is not None:
            batch["data_parallel_rank"] = data_parallel_rank
    else:
        batch = [ts, body] if data_parallel_rank is None else [ts, body, data_parallel_rank]
    return msgpack.packb(batch)


def decode_batch(payload: bytes) -> tuple[float, list[Any]]:
    """(ts, raw events) of either encoding (for tests and tools)."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if isinstance(batch, dict):
        return batch["ts"], batch["events"]
    return batch[0], batch[1]


def topic_for(host: str, port: int, model: str) -> str:
    return f"kv@{host}:{port}@{model}"


class ZmqKVPublisher:
    """A PUB socket bound to (or, with `connect`, connecting to) `endpoint`, and optionally
    vLLM's replay ROUTER at `replay_endpoint`. Sends never block: with no subscriber or a
    slow one, ZMQ drops messages, as with vLLM."""

    def __init__(self, endpoint: str, topic: str, context: zmq.Context | None = None, *,
                 connect: bool = False, replay_endpoint: str | None = None, encoding: str = "map",
                 buffer_steps: int = BUFFER_STEPS) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown KV-event encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        self.endpoint = endpoint
        self.topic = topic.encode()
        self.encoding = encoding
        ctx = context or zmq.Context.instance()
        self._socket = ctx.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        if connect:  # a comma list: several pickers' global sockets, each gets every batch (PUB fans out)
            for ep in endpoint.split(","):
                self._socket.connect(ep)
        else:
            self._socket.bind(endpoint)
        self.seq = 0
        # bound: batches kept for replay; none without a replay socket to serve them
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps if replay_endpoint else 0)
        self._replay_thread: threading.Thread | None = None
        self._running = True
        if replay_endpoint:
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.bind(replay_endpoint)
            self._replay_thread = threading.Thread(target=self._serve_replay, args=(router,), daemon=True,
                                                   name="kv-events-replay")
            self._replay_thread.start()

    def publish(self, events: Sequence[KVEvent]) -> None:
        if not events:
            return
        payload = encode_batch(events, encoding=self.encoding)
        try:
            self._socket.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # high-water mark reached: dropped, as a PUB socket does
        self._buffer.append((self.seq, payload))
        self.seq += 1

    def _serve_replay(self, router: zmq.Socket) -> None:
        try:
            while self._running:
                if not router.poll(100):
                    continue
                frames = router.recv_multipart()
                if len(frames) != 3:
                    continue  # vLLM logs and ignores a malformed request
                client, _, start = frames
                first = int.from_bytes(start, "big")
                for seq, payload in list(self._buffer):
                    if seq >= first:
                        router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
                router.send_multipart([client, b"", END_SEQ, b""])
        except zmq.ZMQError:
            pass  # closed under us
        finally:
            router.close(linger=0)

    def close(self) -> None:
        self._running = False
        if self._replay_thread is not None:
            self._replay_thread.join(timeout=1.0)
        self._socket.close(linger=0)
