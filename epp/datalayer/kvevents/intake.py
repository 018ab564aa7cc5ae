"""KV-event intake: one ZMQ SUB socket per endpoint feeding the block index.

For each subscribed endpoint (e.g. tcp://<pod ip>:5557, the reference's
kvEventsConfig.podDiscoveryConfig.socketPort) a reader task receives multipart
messages into a bounded queue and a processor task applies them in order: frames and
payload decoded (wire.py), the sequence number checked, events applied to the index.

Sequence numbers (vLLM's publisher counts batches from 0, one per message):
- the first message of a subscription is accepted whatever its number (joined late);
- a repeated number is ignored (replayed or duplicated);
- a lower number means the publisher restarted: its cache is new, so the endpoint's
  entries are cleared (`restarts`);
- a gap (batches lost by ZMQ's high-water mark, our queue bound, or a malformed
  payload) is recovered by asking the publisher's replay socket (vLLM's
  `replay_endpoint`, a ROUTER: send [b"", start seq], receive [b"", seq, payload] per
  buffered batch and [b"", -1, b""] at the end) when one is configured; otherwise,
  or when replay fails, the endpoint is marked `stale` (not precise) for
  `stale_grace` seconds. Its entries are kept: vLLM has no snapshot to resync from,
  a server does not re-announce blocks it still holds, and clearing would hide every
  hot prefix it caches (children of an unknown parent cannot be keyed) for as long as
  it keeps them. The cost is bounded: at most the blocks the lost batches touched are
  wrong, a removed one until the server stores it again or the index evicts it.

An endpoint is `precise` (its index view can be trusted for scoring) once it has
delivered a batch, while it is connected, not stale, not broken (`max_consecutive_errors`
malformed messages in a row) and not silent (a request was routed to it, see
`note_routed`, and no event followed within `silence_timeout`: vLLM publishes only on
cache changes, so an idle server is not silent). Otherwise scoring should fall back to
the approximate index for it.

A message over the payload bound makes libzmq drop the connection without reconnecting;
the socket's monitor reports it and the reader re-opens the socket (backing off up to
5 s while the server keeps doing it); what was lost shows as a sequence gap.

Global socket (`bind(address)`, the reference's kvEventsConfig.zmqEndpoint): one SUB
socket bound at the address, publishers connect to it, and each message's topic
kv@<pod>@<model> names its endpoint through `resolve(pod)` (None: counted in the global
stream's `unrouted` and dropped); sequence checks then run per endpoint as above (no
replay: a global socket has no replay address).

Both at once (the reference's default discoverPods with a zmqEndpoint): the global socket
runs beside the per-endpoint subscriptions, as the reference's "local-subscriber" runs
beside its per-pod subscribers, and both feed the endpoint's entries in the one index. An
endpoint then has up to two streams, each with its own sequence and health: `subscribed`
(its own subscription) and `routed` (the global socket's stream for it). Subscribing an
endpoint leaves its global-socket stream and blocks alone; it is judged (`stream`,
`status`) by whichever stream is precise, else the one that delivered last.

Counters are plain attributes of `EndpointStream` (metrics are wired elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
import zmq.utils.monitor

from epp.backoff import Backoff
from epp.datalayer.kvevents.index import BlockIndex
from epp.datalayer.kvevents.wire import DEFAULT_LIMITS, Limits, WireError, decode_batch, parse_frames

__all__ = ["EndpointStream", "KVEventIntake", "REPLAY_END"]

log = logging.getLogger(__name__)

REPLAY_END = (-1).to_bytes(8, "big", signed=True)


@dataclass(slots=True)
class EndpointStream:
    """One endpoint's event stream: where it comes from and how it is doing."""

    endpoint: str
    address: str
    model: str = ""  # model name for block keys; "" = taken from the topic kv@<id>@<model>
    replay_address: str | None = None
    batches: int = 0  # applied
    events: int = 0  # applied
    dropped: int = 0  # messages dropped by the queue bound
    gaps: int = 0  # sequence gaps seen
    missed: int = 0  # batches lost for good (not recovered by replay)
    replayed: int = 0  # batches recovered by replay
    replay_failures: int = 0
    stale_marks: int = 0  # times marked stale after a loss replay did not recover
    restarts: int = 0  # sequence went backwards
    duplicates: int = 0
    decode_errors: int = 0
    index_errors: int = 0
    last_seq: int | None = None
    lag: float | None = None  # seconds from the batch's timestamp to its application
    last_batch_at: float | None = None  # intake clock
    routed_at: float | None = None  # first routing since the last batch (intake clock)
    stale_until: float = 0.0
    broken: bool = False
    connected: bool = False  # as the socket's monitor last reported
    disconnects: int = 0
    consecutive_errors: int = 0
    queued: int = 0
    queued_bytes: int = 0
    topic: str = ""
    unrouted: int = 0  # global socket: messages whose topic named no known endpoint
    _queue: deque[tuple[list[bytes], int]] = field(default_factory=deque, repr=False)


class KVEventIntake:
    def __init__(self, index: BlockIndex, *, topic_filter: str = "kv@", queue_size: int = 1024,
                 max_queue_bytes: int = 64 << 20, rcv_hwm: int = 10_000, replay_timeout: float = 1.0,
                 max_replay: int = 10_000, stale_grace: float = 10.0, silence_timeout: float = 10.0,
                 max_consecutive_errors: int = 3, limits: Limits = DEFAULT_LIMITS,
                 context: zmq.asyncio.Context | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 listener: Callable[[EndpointStream], None] | None = None,
                 resolve: Callable[[str], str | None] | None = None) -> None:
        self.index = index
        self.topic_filter = topic_filter
        self.queue_size = queue_size  # bound: messages waiting per endpoint
        self.max_queue_bytes = max_queue_bytes  # bound: payload bytes waiting per endpoint
        self.rcv_hwm = rcv_hwm  # bound: ZMQ's own receive queue per socket
        self.replay_timeout = replay_timeout
        self.max_replay = max_replay  # bound: batches asked of a replay socket (vLLM buffers 10,000)
        self.stale_grace = stale_grace
        self.silence_timeout = silence_timeout
        self.max_consecutive_errors = max_consecutive_errors
        self.limits = limits
        self.clock = clock
        self.wall_clock = wall_clock
        self.listener = listener
        self.resolve = resolve
        self.global_stream: EndpointStream | None = None
        self.subscribed: dict[str, EndpointStream] = {}  # endpoint -> its own subscription's stream
        self.routed: dict[str, EndpointStream] = {}  # endpoint -> the global socket's stream for it
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._subs: dict[str, _Sub] = {}

    # --- endpoints come and go -------------------------------------------------------

    def subscribe(self, endpoint: str, address: str, *, model: str = "",
                  replay_address: str | None = None) -> EndpointStream:
        """Start receiving `endpoint`'s events from `address` (call inside the event loop).
        Subscribing again with the same address keeps the stream; a new address
        replaces it and forgets what the old one reported (another server, or one whose
        events in between are unknown). The global socket's stream for it is not touched."""
        old = self.subscribed.get(endpoint)
        if old is not None:
            if old.address == address and old.replay_address == replay_address and old.model == model:
                return old
            self._stop(endpoint)
            self.index.clear_endpoint(endpoint)
        stream = self.subscribed[endpoint] = EndpointStream(endpoint, address, model, replay_address)
        self._start(endpoint, stream, bound=False)
        return stream

    def bind(self, address: str) -> EndpointStream:
        """Bind the global SUB socket at `address` (call inside the event loop); messages
        go to the endpoint their topic names (see the module docstring)."""
        if self.global_stream is None:
            self.global_stream = EndpointStream("", address, connected=True)
            self._start(_GLOBAL, self.global_stream, bound=True)
        return self.global_stream

    def _start(self, key: str, stream: EndpointStream, bound: bool) -> None:
        sub = _Sub(*self._open(stream.address, bound), bound=bound)
        sub.tasks = [asyncio.create_task(self._read(stream, sub), name=f"kv-events-read {key}"),
                     asyncio.create_task(self._process(stream, sub.wake), name=f"kv-events-apply {key}")]
        self._subs[key] = sub

    def _open(self, address: str, bound: bool = False) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        """A SUB socket connecting to (or bound at) `address`, and its monitor (connects and
        disconnects; a bound socket's publishers come and go, so it watches none)."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self.rcv_hwm)
        # A larger message makes libzmq drop the connection (and not reconnect: the reader
        # re-opens the socket when the monitor reports it), so it is never buffered whole.
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_payload_bytes + 2 * self.limits.max_topic)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic_filter.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED if bound else
                                          zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            if bound:
                sock.bind(address)
            else:
                sock.connect(address)
        except zmq.ZMQError:
            _close(sock, monitor)
            raise
        return sock, monitor

    def unsubscribe(self, endpoint: str) -> None:
        """Stop the endpoint's own subscription; forget its blocks unless the global socket
        delivers its events too (they stay, kept current by that stream)."""
        self._stop(endpoint)
        if endpoint not in self.routed:
            self.index.remove_endpoint(endpoint)

    def forget(self, endpoint: str) -> None:
        """The endpoint is gone: its subscription and global-socket stream end, its blocks go."""
        self._stop(endpoint)
        self.routed.pop(endpoint, None)
        self.index.remove_endpoint(endpoint)

    def _stop(self, endpoint: str) -> None:
        self.subscribed.pop(endpoint, None)
        sub = self._subs.pop(endpoint, None)
        if sub is None:
            return
        for t in sub.tasks:
            t.cancel()
        _close(sub.sock, sub.monitor)

    async def close(self) -> None:
        tasks = [t for sub in self._subs.values() for t in sub.tasks]
        for endpoint in list(self._subs):
            self._stop(endpoint)
        self.global_stream = None
        self.routed.clear()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._own_context:
            self._ctx.term()

    # --- health ----------------------------------------------------------------------

    def note_routed(self, endpoint: str) -> None:
        """A request was routed to the endpoint: events should follow (silence detection)."""
        for s in (self.subscribed.get(endpoint), self.routed.get(endpoint)):
            if s is not None and s.routed_at is None:
                s.routed_at = self.clock()

    @property
    def streams(self) -> dict[str, EndpointStream]:
        """Each endpoint's stream as `stream` picks it, by endpoint."""
        return {name: s for name, (s, _) in self.judged_all().items() if s is not None}

    def judged_all(self) -> dict[str, tuple[EndpointStream | None, str]]:
        """`judged` of every endpoint with a stream, at one instant."""
        now = self.clock()
        return {name: self.judged(name, now) for name in dict.fromkeys([*self.subscribed, *self.routed])}

    def judged(self, endpoint: str, now: float | None = None) -> tuple[EndpointStream | None, str]:
        """The stream the endpoint is judged by and its status. The stream: its own
        subscription's or the global socket's, whichever is precise, else the one that
        delivered last (its own on a tie). The status: "precise", or why not: "unsubscribed",
        "waiting" (no batch yet), "broken", "disconnected", "stale" (lost batches recently)
        or "silent" (routed to, no event since)."""
        now = self.clock() if now is None else now
        own, routed = self.subscribed.get(endpoint), self.routed.get(endpoint)
        if own is None or routed is None:
            s = own or routed
            return s, "unsubscribed" if s is None else self._status(s, now)
        mine, theirs = (own, self._status(own, now)), (routed, self._status(routed, now))
        if (mine[1] == "precise") != (theirs[1] == "precise"):
            return mine if mine[1] == "precise" else theirs
        return theirs if _delivered(routed) > _delivered(own) else mine

    def stream(self, endpoint: str, now: float | None = None) -> EndpointStream | None:
        return self.judged(endpoint, now)[0]

    def status(self, endpoint: str, now: float | None = None) -> str:
        return self.judged(endpoint, now)[1]

    def _status(self, s: EndpointStream, now: float) -> str:
        if s.batches == 0:
            return "waiting"
        if s.broken:
            return "broken"
        if not s.connected:
            return "disconnected"
        if now < s.stale_until:
            return "stale"
        if s.routed_at is not None and now - s.routed_at > self.silence_timeout:
            return "silent"
        return "precise"

    def is_precise(self, endpoint: str, now: float | None = None) -> bool:
        return self.status(endpoint, now) == "precise"

    # --- the two tasks ---------------------------------------------------------------

    async def _read(self, s: EndpointStream, sub: _Sub) -> None:
        backoff = Backoff(_MIN_BACKOFF, _MAX_BACKOFF, jitter=0.0)
        while True:
            try:
                if await self._listen(s, sub):
                    backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the socket failed under us: re-open it
                log.warning("kv-events %s: receive failed: %s", s.endpoint, e)
            _close(sub.sock, sub.monitor)
            await asyncio.sleep(backoff.next())  # a server that keeps breaking the stream is retried slowly
            try:
                sub.sock, sub.monitor = self._open(s.address, sub.bound)
            except zmq.ZMQError as e:
                log.warning("kv-events %s: cannot re-open: %s", s.endpoint, e)

    async def _listen(self, s: EndpointStream, sub: _Sub) -> bool:
        """Receive until the connection drops; whether any message came meanwhile."""
        poller = zmq.asyncio.Poller()
        poller.register(sub.sock, zmq.POLLIN)
        poller.register(sub.monitor, zmq.POLLIN)
        got = False
        while True:
            ready = dict(await poller.poll())
            if sub.sock in ready:
                got = await self._drain(s, sub) or got
            if sub.monitor in ready:
                event = zmq.utils.monitor.parse_monitor_message(await sub.monitor.recv_multipart())["event"]
                if event == zmq.EVENT_CONNECTED:
                    s.connected = True
                elif event == zmq.EVENT_DISCONNECTED:
                    s.connected = False
                    s.disconnects += 1
                    return await self._drain(s, sub) or got

    async def _drain(self, s: EndpointStream, sub: _Sub) -> bool:
        """Queue the messages the socket holds (at most 64, then let others run)."""
        got = False
        for _ in range(64):
            try:
                frames = await sub.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            got = True
            size = sum(len(f) for f in frames)
            if len(s._queue) >= self.queue_size or s.queued_bytes + size > self.max_queue_bytes:
                s.dropped += 1  # shows as a sequence gap when the next message is applied
            else:
                s._queue.append((frames, size))
                s.queued, s.queued_bytes = len(s._queue), s.queued_bytes + size
                sub.wake.set()
        await asyncio.sleep(0)
        return got

    async def _process(self, s: EndpointStream, wake: asyncio.Event) -> None:
        n = 0
        while True:
            while not s._queue:
                wake.clear()
                await wake.wait()
            frames, size = s._queue.popleft()
            s.queued, s.queued_bytes = len(s._queue), s.queued_bytes - size
            try:
                await self._handle(s, frames)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one endpoint's stream end the task
                log.exception("kv-events %s: message not applied", s.endpoint)
                s.index_errors += 1
                self._mark_stale(s, 1)
            if self.listener is not None:
                try:
                    self.listener(s)
                except Exception:
                    log.exception("kv-events listener failed")
            n += 1
            if n % 64 == 0:
                await asyncio.sleep(0)

    async def _handle(self, s: EndpointStream, frames: list[bytes]) -> None:
        try:
            topic, seq, payload = parse_frames(frames, self.limits)
        except WireError as e:
            self._error(s, e)
            return
        s.topic = topic.decode("utf-8", "replace")
        if s is self.global_stream:
            routed = self._route(s)
            if routed is None:
                return
            s = routed
        last = s.last_seq
        if last is not None:
            if seq == last:
                s.duplicates += 1
                return
            if seq < last:
                s.restarts += 1
                self.index.server_cleared(s.endpoint)
            elif seq > last + 1:
                s.gaps += 1
                await self._recover(s, last + 1, seq)
        s.last_seq = seq
        self._apply(s, payload)

    def _apply(self, s: EndpointStream, payload: bytes) -> bool:
        try:
            batch = decode_batch(payload, self.limits)
        except WireError as e:
            self._error(s, e)
            self._mark_stale(s, 1)  # the batch is lost: what it stored or removed is unknown
            return False
        try:
            self.index.apply(s.endpoint, batch.events, s.model or _topic_model(s.topic))
        except ValueError as e:  # e.g. the index's endpoint bound
            log.warning("kv-events %s: %s", s.endpoint, e)
            s.index_errors += 1
            self._mark_stale(s, 0)  # the batch may be half applied
            return False
        s.batches += 1
        s.events += len(batch.events)
        s.consecutive_errors = 0
        s.broken = False
        s.lag = max(0.0, self.wall_clock() - batch.ts)
        s.last_batch_at = self.clock()
        s.routed_at = None
        return True

    def _route(self, g: EndpointStream) -> EndpointStream | None:
        """The endpoint's stream a global-socket message belongs to (made at its first)."""
        parts = g.topic.split("@")
        name = self.resolve(parts[1]) if len(parts) == 3 and self.resolve is not None else None
        if name is None:
            g.unrouted += 1
            return None
        s = self.routed.get(name)
        if s is None:
            s = self.routed[name] = EndpointStream(name, g.address, connected=True)
        s.topic = g.topic
        return s

    async def _recover(self, s: EndpointStream, start: int, end: int) -> None:
        """Batches start..end-1 were lost: replay them if the publisher can, else mark stale."""
        missing = end - start
        if s.replay_address and missing <= self.max_replay:
            got = await self._replay(s, start, end)
            if got is not None:
                for _, payload in got:
                    if not self._apply(s, payload):
                        return  # a bad replayed batch already marked the endpoint stale
                s.replayed += len(got)
                return
            s.replay_failures += 1
        self._mark_stale(s, missing)

    async def _replay(self, s: EndpointStream, start: int, end: int) -> list[tuple[int, bytes]] | None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_payload_bytes + 64)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replay_timeout
        got: dict[int, bytes] = {}
        try:
            sock.connect(s.replay_address)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while len(got) < end - start:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await sock.poll(remaining * 1000):
                    return None
                frames = await sock.recv_multipart()
                if len(frames) != 3 or frames[0] or len(frames[1]) != 8:
                    return None
                if frames[1] == REPLAY_END:
                    break
                seq = int.from_bytes(frames[1], "big")
                if start <= seq < end:
                    got[seq] = frames[2]
        except zmq.ZMQError as e:
            log.warning("kv-events %s: replay failed: %s", s.endpoint, e)
            return None
        finally:
            sock.close(linger=0)
        if len(got) != end - start:
            return None  # the publisher's buffer no longer holds them all
        return sorted(got.items())

    def _mark_stale(self, s: EndpointStream, missed: int) -> None:
        s.missed += missed
        s.stale_marks += 1
        s.stale_until = self.clock() + self.stale_grace

    def _error(self, s: EndpointStream, e: WireError) -> None:
        s.decode_errors += 1
        s.consecutive_errors += 1
        if s.consecutive_errors >= self.max_consecutive_errors:
            s.broken = True
        log.debug("kv-events %s: %s", s.endpoint, e)


_MIN_BACKOFF, _MAX_BACKOFF = 0.1, 5.0  # seconds before re-opening a dropped stream
_GLOBAL = "\0global"  # the bound socket's key among the subscriptions (not an endpoint name)


@dataclass(slots=True)
class _Sub:
    sock: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    bound: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)


def _close(*sockets: zmq.asyncio.Socket) -> None:
    for sock in sockets:
        sock.close(linger=0)


def _delivered(s: EndpointStream) -> float:
    """When the stream last applied a batch (intake clock); -inf if never."""
    return -float("inf") if s.last_batch_at is None else s.last_batch_at


def _topic_model(topic: str) -> str:
    """The model of vLLM's conventional topic kv@<pod>@<model> (llm-d's guides), else ""."""
    parts = topic.split("@")
    return parts[2] if len(parts) == 3 else ""
