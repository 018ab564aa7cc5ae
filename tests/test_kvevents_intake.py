"""The KV-event intake against real ZMQ sockets on 127.0.0.1: the project's simulator
publisher, and a raw PUB (plus a replay ROUTER speaking vLLM's protocol) that sends gaps,
garbage, restarts and AllBlocksCleared."""

from __future__ import annotations

import asyncio
import random
import time

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.launch import free_port
from epp.datalayer.kvevents import BlockIndex, BlockKeyer, EndpointStream, KVEventIntake
from epp.datalayer.kvevents.intake import REPLAY_END

BS = 4


def prompt(n_blocks: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n_blocks * BS)]


def server_hashes(tokens: list[int], salt: int = 7) -> list[int]:
    out, parent = [], salt
    for i in range(len(tokens) // BS):
        parent = hash((parent, tuple(tokens[i * BS:(i + 1) * BS]))) & (2**64 - 1)
        out.append(parent)
    return out


def stored(tokens: list[int], start: int = 0, medium: str = "GPU") -> list:
    hs = server_hashes(tokens)
    return ["BlockStored", hs[start:], hs[start - 1] if start else None, tokens[start * BS:], BS, None, medium, None]


def removed(tokens: list[int], blocks: slice) -> list:
    return ["BlockRemoved", server_hashes(tokens)[blocks], "GPU"]


def batch(*events: list, ts: float | None = None) -> bytes:
    return msgpack.packb([time.time() if ts is None else ts, list(events), 0])


class Publisher:
    """A vLLM-like publisher: PUB socket, sequence numbers, a replay buffer and optionally
    a ROUTER replay socket answering as vLLM's _service_replay does."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: bytes = b"kv@10.0.0.1:8000@m", replay: bool = False,
                 port: int | None = None):
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = port or free_port()
        self.pub.bind(f"tcp://127.0.0.1:{port}")
        self.address = f"tcp://127.0.0.1:{port}"
        self.topic, self.seq, self.buffer = topic, 0, {}
        self.replay_address, self._router, self._task = None, None, None
        if replay:
            self._router = ctx.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            rport = free_port()
            self._router.bind(f"tcp://127.0.0.1:{rport}")
            self.replay_address = f"tcp://127.0.0.1:{rport}"
            self._task = asyncio.create_task(self._serve_replay())

    async def send(self, payload: bytes, *, publish: bool = True, seq: int | None = None) -> int:
        """Buffer the batch under the next sequence number; publish it unless told to lose it."""
        seq = self.seq if seq is None else seq
        self.buffer[seq] = payload
        if publish:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        self.seq = seq + 1
        return seq

    async def _serve_replay(self) -> None:
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            for seq in sorted(self.buffer):
                if seq >= int.from_bytes(start, "big"):
                    await self._router.send_multipart([client, b"", seq.to_bytes(8, "big"), self.buffer[seq]])
            await self._router.send_multipart([client, b"", REPLAY_END, b""])

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._router is not None:
            self._router.close(linger=0)
        self.pub.close(linger=0)


class Harness:
    def __init__(self, **kwargs) -> None:
        self.now = 0.0
        self.changed = asyncio.Event()
        self.index = BlockIndex(BlockKeyer(block_size=BS))
        self.ctx = zmq.asyncio.Context()
        self.intake = KVEventIntake(self.index, context=self.ctx, clock=lambda: self.now,
                                    listener=lambda s: self.changed.set(), **kwargs)

    async def until(self, cond, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, "condition not reached"
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.05))
            except TimeoutError:
                pass

    async def join(self, pub: Publisher, endpoint: str = "a", **kwargs) -> EndpointStream:
        """Subscribe, then publish empty batches until one arrives (ZMQ's slow joiner)."""
        s = self.intake.subscribe(endpoint, pub.address, replay_address=pub.replay_address, **kwargs)
        deadline = asyncio.get_running_loop().time() + 10
        while s.batches == 0:
            assert asyncio.get_running_loop().time() < deadline, "subscriber never joined"
            await pub.send(batch())
            await self._briefly(lambda: s.batches > 0)
        return s

    async def _briefly(self, cond) -> None:
        try:
            await self.until(cond, timeout=0.1)
        except AssertionError:
            pass

    async def close(self) -> None:
        await self.intake.close()
        self.ctx.term()


@pytest.fixture
async def h():
    harness = Harness(stale_grace=5.0, silence_timeout=3.0, replay_timeout=0.5)
    pubs: list[Publisher] = []
    harness.publisher = lambda **kw: pubs.append(Publisher(harness.ctx, **kw)) or pubs[-1]
    yield harness
    for p in pubs:
        p.close()
    await harness.close()


def held(index: BlockIndex, tokens: list[int], endpoint: str = "a", model: str = "m") -> int:
    m = index.match(tokens, model).get(endpoint)
    return 0 if m is None else m.blocks


async def test_stores_removes_and_clears_reach_the_index(h):
    pub = h.publisher()
    s = await h.join(pub)
    p = prompt(4, 1)
    await pub.send(batch(stored(p), ts=time.time() - 0.25))
    await h.until(lambda: held(h.index, p) == 4)  # model "m" taken from the topic kv@...@m
    assert 0.25 <= s.lag < 5 and h.intake.is_precise("a")
    await pub.send(batch(removed(p, slice(2, 4))))
    await h.until(lambda: held(h.index, p) == 2)
    await pub.send(batch(["AllBlocksCleared"]))
    await h.until(lambda: held(h.index, p) == 0)
    assert s.gaps == s.stale_marks == s.decode_errors == 0 and s.events >= 3


async def test_topic_filter(h):
    pub = h.publisher(topic=b"other@x@m")
    s = h.intake.subscribe("a", pub.address)
    assert h.intake.status("a") == "waiting"
    ok = h.publisher()
    s_ok = await h.join(ok, "b")
    p = prompt(2, 2)
    for _ in range(5):
        await pub.send(batch(stored(p)))
    await ok.send(batch(stored(p)))
    await h.until(lambda: held(h.index, p, "b") == 2)
    assert s.batches == 0 and s_ok.batches >= 2 and held(h.index, p, "a") == 0


async def test_a_gap_without_replay_marks_the_endpoint_stale(h):
    pub = h.publisher()
    s = await h.join(pub)
    p, q, r = prompt(3, 3), prompt(4, 4), prompt(2, 5)
    await pub.send(batch(stored(p)))
    await h.until(lambda: held(h.index, p) == 3)
    await pub.send(batch(stored(q[:2 * BS])), publish=False)  # lost on the way
    await pub.send(batch(stored(q, start=2), stored(r)))  # q's rest chains to the lost blocks
    await h.until(lambda: held(h.index, r) == 2)
    assert (s.gaps, s.missed, s.stale_marks) == (1, 1, 1)
    assert h.intake.status("a") == "stale"
    assert held(h.index, p) == 3  # kept: the server still caches it and will not say so again
    assert held(h.index, q) == 0 and h.index.stats.unchained == 1
    h.now += 5.0
    assert h.intake.is_precise("a")


async def test_a_gap_is_recovered_by_replay(h):
    pub = h.publisher(replay=True)
    s = await h.join(pub)
    p = prompt(4, 5)
    await pub.send(batch(stored(p[:2 * BS])), publish=False)  # lost; the replay buffer has it
    await pub.send(batch(stored(p, start=2)))  # its parent is in the lost batch
    await h.until(lambda: held(h.index, p) == 4)
    assert (s.gaps, s.replayed, s.stale_marks, s.missed) == (1, 1, 0, 0)
    assert h.intake.is_precise("a")


async def test_replay_that_does_not_answer_falls_back_to_staleness(h):
    pub = h.publisher()
    s = h.intake.subscribe("a", pub.address, replay_address=f"tcp://127.0.0.1:{free_port()}")
    while s.batches == 0:
        await pub.send(batch())
        await h._briefly(lambda: s.batches > 0)
    await pub.send(batch(), publish=False)
    await pub.send(batch(stored(prompt(1, 6))))
    await h.until(lambda: s.stale_marks == 1)
    assert s.replay_failures == 1 and s.replayed == 0 and s.missed == 1


async def test_garbage_is_counted_and_a_broken_stream_is_not_precise(h):
    pub = h.publisher()
    s = await h.join(pub)
    await pub.pub.send_multipart([b"kv@x@m", b"short"])  # two frames
    await pub.pub.send_multipart([b"kv@x@m", b"\x00" * 3, b"payload"])  # bad sequence frame
    await pub.send(b"\xc1 not msgpack")
    await h.until(lambda: s.decode_errors == 3)
    assert s.broken and h.intake.status("a") == "broken"
    p = prompt(2, 7)
    await pub.send(batch(stored(p)))
    await h.until(lambda: held(h.index, p) == 2)
    assert not s.broken and s.stale_marks == 1  # the garbage batch was lost


async def test_restart_and_duplicates(h):
    pub = h.publisher()
    s = await h.join(pub)
    cleared: list[str] = []
    h.index.on_server_cleared = cleared.append
    p, q = prompt(2, 8), prompt(2, 9)
    seq = await pub.send(batch(stored(p)))
    await h.until(lambda: held(h.index, p) == 2)
    await pub.send(batch(removed(p, slice(0, 2))), seq=seq)  # a repeat of that number: ignored
    await pub.send(batch(stored(q)), seq=0)  # the publisher restarted
    await h.until(lambda: held(h.index, q) == 2)
    assert s.duplicates == 1 and s.restarts == 1 and held(h.index, p) == 0
    assert cleared == ["a"]  # the restart told the index's owner (whose guesses go too)


async def test_silence_after_routing_marks_the_endpoint_not_precise(h):
    pub = h.publisher()
    await h.join(pub)
    h.intake.note_routed("a")
    h.now += 2.0
    assert h.intake.is_precise("a")
    h.now += 2.0
    assert h.intake.status("a") == "silent"
    await pub.send(batch(stored(prompt(1, 10))))
    await h.until(lambda: h.intake.is_precise("a"))


async def test_the_queue_bound_drops_and_the_gap_is_handled():
    h = Harness(queue_size=1)
    pub = Publisher(h.ctx)
    try:
        s = await h.join(pub)
        slow_apply = h.index.apply

        def apply(*args, **kwargs):
            time.sleep(0.002)  # a slow index lets messages pile up behind it
            slow_apply(*args, **kwargs)
        h.index.apply = apply
        p = prompt(1, 11)
        for _ in range(100):
            await pub.send(batch())
        while held(h.index, p) == 0:  # a dropped last batch shows only when another follows
            await pub.send(batch(stored(p)))
            await h._briefly(lambda: held(h.index, p) == 1)
        assert s.dropped > 0 and s.gaps > 0 and s.queued <= 1
        assert s.missed == s.dropped  # every dropped batch shows as missed
    finally:
        pub.close()
        await h.close()


async def test_endpoints_come_and_go(h):
    pub = h.publisher()
    s = await h.join(pub)
    assert h.intake.subscribe("a", pub.address) is s  # same address: the same stream
    p = prompt(2, 12)
    await pub.send(batch(stored(p)))
    await h.until(lambda: held(h.index, p) == 2)
    moved = h.publisher()
    s2 = h.intake.subscribe("a", moved.address)  # the endpoint's events now come from elsewhere
    assert s2 is not s and held(h.index, p) == 0
    await pub.send(batch(stored(p)))  # the old address is no longer listened to
    q = prompt(2, 13)
    while held(h.index, q) == 0:
        await moved.send(batch(stored(q)))
        await h._briefly(lambda: held(h.index, q) == 2)
    assert held(h.index, p) == 0
    h.intake.unsubscribe("a")
    assert held(h.index, q) == 0 and "a" not in h.intake.streams and "a" not in h.index.endpoints
    assert h.intake.status("a") == "unsubscribed"


async def test_the_simulators_publisher_feeds_the_index():
    """Engine + ZmqKVPublisher from simulator/: stores, LRU evictions and the index agree
    with what the engine holds, block for block."""
    from simulator import Engine, EngineConfig, EngineLoop, EngineRequest, VirtualClock
    from simulator.kv_events import ZmqKVPublisher

    h = Harness()
    h.index = BlockIndex(BlockKeyer(block_size=16))
    h.intake.index = h.index
    port = free_port()
    pub = ZmqKVPublisher(f"tcp://127.0.0.1:{port}", "kv@127.0.0.1:8000@sim-model")
    try:
        s = h.intake.subscribe("sim", f"tcp://127.0.0.1:{port}")
        engine = Engine(EngineConfig(num_gpu_blocks=24), on_kv_events=pub.publish)
        clock = VirtualClock()
        loop = EngineLoop(engine, clock)
        from simulator import AllBlocksCleared as SimCleared
        while s.batches == 0:
            pub.publish([SimCleared()])
            await h._briefly(lambda: s.batches > 0)
        rng = random.Random(13)
        system = [rng.randrange(30_000) for _ in range(64)]
        prompts = [system + [rng.randrange(30_000) for _ in range(48)] for _ in range(10)]
        for i, p in enumerate(prompts):
            loop.submit(EngineRequest(f"r{i}", p, 1))
            clock.run_until_idle()
        last = pub.seq - 1
        await h.until(lambda: s.last_seq == last)
        for p in prompts:
            assert held(h.index, p, "sim", "sim-model") == engine.cached_prefix_blocks(p)
        assert held(h.index, prompts[-1], "sim", "sim-model") == 7 and held(h.index, prompts[0], "sim", "sim-model") < 7
        assert s.gaps == s.decode_errors == 0
    finally:
        pub.close()
        await h.close()


async def test_the_simulator_server_over_http_and_its_cache_reset():
    """`epp sim`'s server in process, publishing on a ZMQ port: a completion's prompt blocks
    reach the index under the topic's model name; /reset_prefix_cache clears them."""
    import aiohttp

    from simulator.server import SimConfig, SimServer
    from simulator.tokenizer import VOCAB_SIZE

    kv_port = free_port()
    server = SimServer(SimConfig(model="m", port=free_port(), time_scale=20,
                                 kv_events_endpoint=f"tcp://127.0.0.1:{kv_port}"))
    await server.start()
    h = Harness()
    h.index = h.intake.index = BlockIndex(BlockKeyer(block_size=16))
    base = f"http://127.0.0.1:{server.config.port}"
    try:
        s = h.intake.subscribe("sim", f"tcp://127.0.0.1:{kv_port}")
        async with aiohttp.ClientSession() as http:
            while s.batches == 0:  # each reset publishes AllBlocksCleared: a probe for the slow joiner
                async with http.post(f"{base}/reset_prefix_cache") as r:
                    assert r.status == 200
                await h._briefly(lambda: s.batches > 0)
            rng = random.Random(14)
            tokens = [rng.randrange(1, VOCAB_SIZE) for _ in range(5 * 16 + 3)]
            async with http.post(f"{base}/v1/completions", json={"model": "m", "prompt": tokens, "max_tokens": 1}) as r:
                assert r.status == 200
            await h.until(lambda: held(h.index, tokens, "sim") == 5)
            assert s.topic == f"kv@127.0.0.1:{server.config.port}@m"
            async with http.post(f"{base}/reset_prefix_cache") as r:
                assert r.status == 200
            await h.until(lambda: held(h.index, tokens, "sim") == 0)
        assert s.gaps == s.decode_errors == 0 and h.intake.is_precise("sim")
    finally:
        await h.close()
        await server.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 9), st.booleans(), st.sampled_from(["deliver", "lose", "repeat"])),
                min_size=1, max_size=40), st.booleans())
async def test_sequence_handling_errs_only_where_batches_were_lost(ops, replay):
    """A publisher stores and removes single-block prompts; the channel loses or repeats
    batches (after the first, which starts the subscription: what came before it is
    unknowable). Without replay the index may miss blocks but never holds one the server
    removed, except one whose removal was lost; with a replay socket answering from the
    publisher's buffer it is exact."""
    ops = [(ops[0][0], ops[0][1], "deliver"), *ops[1:]]
    index = BlockIndex(BlockKeyer(block_size=BS))
    intake = KVEventIntake(index, context=zmq.asyncio.Context.instance())
    s = EndpointStream("a", "tcp://unused", model="m", replay_address="tcp://replay" if replay else None)
    buffer: dict[int, bytes] = {}

    async def fake_replay(_s, start, end):
        return [(q, buffer[q]) for q in range(start, end)]
    intake._replay = fake_replay
    prompts = [prompt(1, 1000 + i) for i in range(10)]
    truth: set[int] = set()
    lost: set[int] = set()  # prompts a lost batch touched
    for seq, (i, store, fate) in enumerate(ops):
        if fate == "lose":
            lost.add(i)
        if store:
            payload, _ = batch(stored(prompts[i])), truth.add(i)
        else:
            payload, _ = batch(removed(prompts[i], slice(0, 1))), truth.discard(i)
        buffer[seq] = payload
        frames = [b"kv@a@m", seq.to_bytes(8, "big"), payload]
        for _ in range({"deliver": 1, "lose": 0, "repeat": 2}[fate]):
            await intake._handle(s, frames)
    if ops[-1][2] == "lose":  # a loss shows only when a later batch arrives
        buffer[len(ops)] = batch()
        await intake._handle(s, [b"kv@a@m", len(ops).to_bytes(8, "big"), buffer[len(ops)]])
    held_now = {i for i, p in enumerate(prompts) if held(index, p) == 1}
    if replay:
        assert held_now == truth and s.stale_marks == 0
    else:
        assert held_now ^ truth <= lost
        assert (s.stale_marks > 0) == bool(lost)


async def test_oversized_messages_never_reach_the_index():
    """Bounded by ZMQ's MAXMSGSIZE (the connection is dropped and re-made) and by the
    decoder's payload bound (counted as a decode error): neither is ever applied."""
    from epp.datalayer.kvevents import Limits

    big, huge = prompt(40, 15), prompt(400, 16)
    bound = len(batch(stored(big))) - 10  # big exceeds the decoder's bound, not ZMQ's; huge both
    h = Harness(limits=Limits(max_payload_bytes=bound, max_topic=64))
    pub = Publisher(h.ctx)
    try:
        s = await h.join(pub)
        assert bound + 2 * 64 < len(batch(stored(huge)))
        await pub.send(batch(stored(big)))
        await h.until(lambda: s.decode_errors == 1)
        await pub.send(batch(stored(huge)))
        await h.until(lambda: s.disconnects == 1)
        small = prompt(1, 17)
        while held(h.index, small) == 0:  # the socket is re-opened
            await pub.send(batch(stored(small)))
            await h._briefly(lambda: held(h.index, small) == 1)
        assert held(h.index, huge) == held(h.index, big) == 0
        assert s.connected and s.gaps >= 1 and h.index.stats.stored_blocks == 1
    finally:
        pub.close()
        await h.close()


async def test_a_restarted_server_is_followed():
    """The publisher goes away and comes back on the same port with its sequence reset:
    the socket follows it, and what the old process cached is forgotten."""
    h = Harness()
    pub = Publisher(h.ctx)
    port = int(pub.address.rsplit(":", 1)[1])
    try:
        s = await h.join(pub)
        p, q = prompt(2, 18), prompt(2, 19)
        for _ in range(3):
            await pub.send(batch())
        await pub.send(batch(stored(p)))
        await h.until(lambda: held(h.index, p) == 2)
        pub.close()
        await h.until(lambda: s.disconnects == 1 and not s.connected)
        assert h.intake.status("a") == "disconnected"
        pub = Publisher(h.ctx, port=port)
        while held(h.index, q) == 0:
            pub.seq = 0  # every attempt is the new process's first batch until one arrives
            await pub.send(batch(stored(q)))
            await h._briefly(lambda: held(h.index, q) == 2)
        assert s.restarts == 1 and held(h.index, p) == 0 and h.intake.is_precise("a")
    finally:
        pub.close()
        await h.close()


async def test_global_socket_routes_each_topic_to_its_endpoint_with_its_own_sequence():
    """bind(): one SUB socket the publishers connect to (kvEventsConfig.zmqEndpoint); the
    topic's pod part names the endpoint, sequence numbers are checked per endpoint, and a
    topic naming no endpoint is counted and dropped."""
    pods = {"10.0.0.1:8000": "a", "10.0.0.2:8000": "b"}
    harness = Harness(resolve=pods.get)
    port = free_port()
    g = harness.intake.bind(f"tcp://127.0.0.1:{port}")
    pubs = []
    try:
        for topic in (b"kv@10.0.0.1:8000@m", b"kv@10.0.0.2:8000@m", b"kv@10.9.9.9:8000@m"):
            sock = harness.ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")  # as vLLM connects to a non-wildcard address
            pubs.append((topic, sock))

        async def send(i: int, seq: int, payload: bytes) -> None:
            topic, sock = pubs[i]
            await sock.send_multipart([topic, seq.to_bytes(8, "big"), payload])

        deadline = asyncio.get_running_loop().time() + 10
        while "a" not in harness.intake.streams or "b" not in harness.intake.streams or not g.unrouted:
            assert asyncio.get_running_loop().time() < deadline, "publishers never joined"
            for i in range(3):
                await send(i, 0, batch())
            await harness._briefly(lambda: False)
        pa, pb = prompt(3, 1), prompt(2, 2)
        await send(0, 1, batch(stored(pa)))
        await send(1, 5, batch(stored(pb)))  # b's first batches were 0s: 5 is a gap for b only
        await harness.until(lambda: held(harness.index, pa, "a") == 3 and held(harness.index, pb, "b") == 2)
        a, b = harness.intake.streams["a"], harness.intake.streams["b"]
        assert (a.gaps, b.gaps) == (0, 1) and harness.intake.status("a") == "precise"
        assert harness.intake.status("b") == "stale"  # no replay on a global socket
        assert held(harness.index, pa, "b") == 0
    finally:
        for _, sock in pubs:
            sock.close(linger=0)
        await harness.close()


async def test_global_socket_and_own_subscription_run_side_by_side(h):
    """Both configured (a zmqEndpoint with discoverPods, the reference's default): the
    reference runs its global socket's subscriber beside the per-pod ones, both feeding
    the one index. Subscribing an endpoint the global socket already delivers for keeps
    that stream and the blocks it brought; either source's events count for the endpoint,
    each stream with its own sequence; unsubscribe ends only the endpoint's own
    subscription, forget (the endpoint gone) both and its blocks."""
    h.intake.resolve = {"10.0.0.1:8000": "a"}.get
    port = free_port()
    h.intake.bind(f"tcp://127.0.0.1:{port}")
    into_global = h.ctx.socket(zmq.PUB)
    into_global.setsockopt(zmq.LINGER, 0)
    into_global.connect(f"tcp://127.0.0.1:{port}")
    seq = iter(range(10_000))
    p, q = prompt(3, 21), prompt(2, 22)
    try:
        while held(h.index, p) < 3:  # resent until the publisher has joined
            await into_global.send_multipart([b"kv@10.0.0.1:8000@m", next(seq).to_bytes(8, "big"),
                                              batch(stored(p))])
            await h._briefly(lambda: held(h.index, p) == 3)
        routed = h.intake.routed["a"]
        own_pub = h.publisher(topic=b"kv@pod-a@m")
        own = h.intake.subscribe("a", own_pub.address)
        assert h.intake.routed["a"] is routed and held(h.index, p) == 3  # neither replaced nor cleared
        assert h.intake.stream("a") is routed and h.intake.status("a") == "precise"  # its own: still waiting
        await into_global.send_multipart([b"kv@10.0.0.1:8000@m", next(seq).to_bytes(8, "big"),
                                          batch(removed(p, slice(2, 3)))])
        await h.until(lambda: held(h.index, p) == 2)
        while held(h.index, q) < 2:  # the endpoint's own publisher, its own sequence from 0
            await own_pub.send(batch(stored(q)))
            await h._briefly(lambda: held(h.index, q) == 2)
        assert own.batches > 0 and (own.gaps, routed.gaps, own.restarts, routed.restarts) == (0, 0, 0, 0)
        h.intake.unsubscribe("a")  # e.g. relabelled out of podLabelSelector
        assert "a" not in h.intake.subscribed and h.intake.status("a") == "precise"
        assert (held(h.index, p), held(h.index, q)) == (2, 2)  # kept: the global socket still delivers
        h.intake.forget("a")
        assert h.intake.status("a") == "unsubscribed" and held(h.index, p) == held(h.index, q) == 0
    finally:
        into_global.close(linger=0)


def test_an_endpoint_with_two_streams_is_judged_by_the_precise_one_else_the_latest():
    """stream()/status(): of the endpoint's own subscription and the global socket's stream
    for it, the precise one; neither precise: the one that delivered last (its own on a
    tie); note_routed starts silence detection on both."""
    ctx = zmq.asyncio.Context()
    intake = KVEventIntake(BlockIndex(BlockKeyer(block_size=BS)), context=ctx, clock=lambda: 50.0,
                           silence_timeout=3.0)
    own = EndpointStream("a", "tcp://10.0.0.1:5557", batches=1, connected=True, last_batch_at=20.0)
    routed = EndpointStream("a", "tcp://0.0.0.0:5557", batches=1, connected=True, last_batch_at=10.0)
    intake.subscribed["a"], intake.routed["a"] = own, routed
    assert intake.stream("a") is own and intake.status("a") == "precise"  # both precise: the latest
    own.stale_until = 60.0
    assert intake.stream("a") is routed and intake.status("a") == "precise"
    routed.connected = False
    assert intake.stream("a") is own and intake.status("a") == "stale"  # neither: the latest
    routed.last_batch_at = 30.0
    assert intake.status("a") == "disconnected" and intake.streams == {"a": routed}
    intake.note_routed("a")
    assert own.routed_at == routed.routed_at == 50.0
    ctx.term()
