"""The native transport under hostile HTTP/2 peers (issue 8 findings 2 and 3), over real
sockets. Well-formed traffic is driven by the `h2` library as an independent client; raw
frames are written where h2 refuses to misbehave. Every connection error gets GOAWAY with
its RFC 9113 code, stream errors get RST_STREAM, nothing is left in flight, and a fresh
connection is then served."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h2.config
import h2.connection
import h2.events
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from test_h2grpc import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Client,
    frame,
    grpc_message,
    request_block,
)

from epp.handlers.h2.connection import H2Connection
from epp.handlers.h2.frames import ConnectionLimits
from epp.handlers.h2.hpack import encode_literal
from epp.handlers.h2.server import H2GrpcServer
from epp.handlers.protocol import METHOD_PATH
from tests.extproc import FLOW_CONTROL, Harness, body_msg, completion, destination, headers_msg
from tests.helpers import until

U32 = struct.Struct(">I")
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM, NO_ERROR = 0x7, 0x9, 0xB, 0x0
REQUEST_HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", METHOD_PATH), (":authority", "epp"),
                   ("content-type", "application/grpc"), ("te", "trailers")]


class Native(Harness):
    transport = "native"


@asynccontextmanager
async def h2_server(h: Native, **settings) -> AsyncIterator[tuple[H2GrpcServer, int]]:
    """A native ext_proc server over the harness with these settings on a free port (and
    its port), stopped on the way out."""
    server = H2GrpcServer(h.ext_proc, limits=ConnectionLimits(**settings))
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.stop(0)


# ------------------------------------------------------------------ an h2-library client
async def h2_request(port: int) -> tuple[dict[str, str], list[ProcessingResponse]]:
    """One bodiless ext_proc request on a new connection, as a conforming client sends it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, REQUEST_HEADERS)
    conn.send_data(sid, grpc_message(headers_msg(method="GET", path="/v1/models", eos=True)), end_stream=True)
    writer.write(conn.data_to_send())
    data, trailers = b"", None
    try:
        while trailers is None:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, "the server closed the connection"
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    trailers = dict(ev.headers)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    replies, pos = [], 0
    while pos < len(data):
        n = U32.unpack_from(data, pos + 1)[0]
        replies.append(ProcessingResponse.FromString(data[pos + 5:pos + 5 + n]))
        pos += 5 + n
    return trailers, replies


async def assert_still_serving(h: Harness, port: int) -> None:
    trailers, replies = await h2_request(port)
    assert trailers["grpc-status"] == "0"
    destination(replies[0])
    await h.assert_released()


async def handshake(port: int) -> Client:
    c = await Client.connect(port)
    await c.until(lambda f: f[0] == SETTINGS and f[1] & 1)  # our SETTINGS acknowledged
    return c


async def goaway_code(c: Client, debug: str = "") -> int:
    f = await c.until(lambda f: f[0] == GOAWAY)
    assert debug.encode() in f[3][8:]
    try:
        assert await asyncio.wait_for(c.reader.read(), 10) == b""  # then the server closes
    except ConnectionResetError:  # it closed with some of our bytes unread
        pass
    return U32.unpack_from(f[3], 4)[0]


async def test_h2_library_sees_the_advertised_limits():
    async with Native() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while not any(isinstance(e, h2.events.RemoteSettingsChanged)
                      for e in conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))):
            pass
        assert conn.remote_settings.max_concurrent_streams == 1024
        assert conn.remote_settings.max_header_list_size == 256 * 1024
        writer.close()
        await assert_still_serving(h, h.server.port)


# ------------------------------------------------------------------ connection errors: GOAWAY + code
def _open(c: Client, sid: int) -> None:
    c.send(frame(HEADERS, END_HEADERS, sid, request_block()))


BIG_FIELD = encode_literal("x-big", "a" * 600_000)  # one valid field: only the block's size is wrong
CONNECTION_ERRORS = {
    # stream ids (RFC 9113 5.1, 5.1.1)
    "reused stream id": (lambda c: (c.open_stream(1, headers_msg(method="GET", eos=True), end=True),
                                    _open(c, 1)), PROTOCOL_ERROR),
    "lower stream id": (lambda c: (_open(c, 5), _open(c, 3)), PROTOCOL_ERROR),
    "even stream id": (lambda c: _open(c, 2), PROTOCOL_ERROR),
    "HEADERS on stream 0": (lambda c: _open(c, 0), PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (lambda c: c.send(frame(RST_STREAM, 0, 7, U32.pack(8))), PROTOCOL_ERROR),
    "WINDOW_UPDATE on an idle stream": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 7, U32.pack(1))), PROTOCOL_ERROR),
    "DATA on an idle stream": (lambda c: c.send(frame(DATA, 0, 7, b"\x00" * 5)), PROTOCOL_ERROR),
    "DATA on stream 0": (lambda c: c.send(frame(DATA, 0, 0, b"x")), PROTOCOL_ERROR),
    # header blocks (finding 2: one large HEADERS frame; CONTINUATION floods)
    "600 KB single HEADERS frame": (lambda c: c.send(frame(HEADERS, END_HEADERS, 1, request_block() + BIG_FIELD)),
                                    COMPRESSION_ERROR, "header block over 262144 bytes"),
    "header block over the limit in CONTINUATION": (lambda c: (
        c.send(frame(HEADERS, 0, 1, BIG_FIELD[:200_000])),
        c.send(frame(CONTINUATION, 0, 1, BIG_FIELD[200_000:300_000]))), COMPRESSION_ERROR,
        "header block over 262144 bytes"),
    "CONTINUATION flood of empty frames": (lambda c: (
        c.send(frame(HEADERS, 0, 1, request_block()[:10])),
        [c.send(frame(CONTINUATION, 0, 1)) for _ in range(100)]), ENHANCE_YOUR_CALM, "CONTINUATION frames"),
    "CONTINUATION without HEADERS": (lambda c: c.send(frame(CONTINUATION, END_HEADERS, 1, b"")), PROTOCOL_ERROR),
    "a frame between HEADERS and CONTINUATION": (lambda c: (
        c.send(frame(HEADERS, 0, 1, request_block()[:10])), c.send(frame(PING, 0, 0, b"12345678"))),
        PROTOCOL_ERROR),
    # frame sizes and control frames (RFC 9113 6)
    "frame over SETTINGS_MAX_FRAME_SIZE": (lambda c: c.send(frame(DATA, 0, 1, b"\x00" * ((1 << 20) + 1))),
                                           FRAME_SIZE_ERROR),
    "PING of 7 bytes": (lambda c: c.send(frame(PING, 0, 0, b"1234567")), FRAME_SIZE_ERROR),
    "PING on a stream": (lambda c: c.send(frame(PING, 0, 1, b"12345678")), PROTOCOL_ERROR),
    "SETTINGS ACK with a payload": (lambda c: c.send(frame(SETTINGS, 1, 0, b"\x00" * 6)), FRAME_SIZE_ERROR),
    "SETTINGS of 5 bytes": (lambda c: c.send(frame(SETTINGS, 0, 0, b"\x00" * 5)), FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (lambda c: c.send(frame(SETTINGS, 0, 1)), PROTOCOL_ERROR),
    "bad SETTINGS_MAX_FRAME_SIZE": (lambda c: c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 100))),
                                    PROTOCOL_ERROR),
    "initial window over 2^31-1": (lambda c: c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 31))),
                                   FLOW_CONTROL_ERROR),
    "connection window overflow": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 0, U32.pack(0x7FFFFFFF))),
                                   FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE of 0 on the connection": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 0, U32.pack(0))),
                                             PROTOCOL_ERROR),
    "RST_STREAM of 3 bytes": (lambda c: (_open(c, 1), c.send(frame(RST_STREAM, 0, 1, b"\x00" * 3))),
                              FRAME_SIZE_ERROR),
    "PUSH_PROMISE from a client": (lambda c: c.send(frame(PUSH_PROMISE, END_HEADERS, 1, U32.pack(2))),
                                   PROTOCOL_ERROR),
    "GOAWAY on a stream": (lambda c: c.send(frame(GOAWAY, 0, 1, U32.pack(0) + U32.pack(0))), PROTOCOL_ERROR),
    "PRIORITY on stream 0": (lambda c: c.send(frame(PRIORITY, 0, 0, b"\x00" * 5)), PROTOCOL_ERROR),
    "HPACK index out of range": (lambda c: c.send(frame(HEADERS, END_HEADERS, 1, b"\xff\x7f")), COMPRESSION_ERROR),
    "DATA padding longer than the frame": (lambda c: (_open(c, 1), c.send(frame(DATA, PADDED, 1, b"\x05abc"))),
                                           PROTOCOL_ERROR),
    "HEADERS padding longer than the block": (lambda c: c.send(frame(HEADERS, END_HEADERS | PADDED, 1,
                                                                     b"\x50" + request_block()[:20])), PROTOCOL_ERROR),
    "HEADERS priority fields cut short": (lambda c: c.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\x00\x00")),
                                          FRAME_SIZE_ERROR),
    "bad SETTINGS_ENABLE_PUSH": (lambda c: c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 2))), PROTOCOL_ERROR),
    "WINDOW_UPDATE of 3 bytes": (lambda c: c.send(frame(WINDOW_UPDATE, 0, 0, b"\x00" * 3)), FRAME_SIZE_ERROR),
    "a stream window pushed over 2^31-1 by SETTINGS": (lambda c: (
        c.open_stream(1, headers_msg()),
        c.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(0x7FFFFFFF - 65535))),
        c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65536)))), FLOW_CONTROL_ERROR),
}


@pytest.mark.parametrize("case", sorted(CONNECTION_ERRORS))
async def test_connection_errors_get_goaway_with_their_code(case):
    send, code, *debug = CONNECTION_ERRORS[case]
    async with Native() as h:
        c = await handshake(h.server.port)
        send(c)
        assert await goaway_code(c, *debug) == code
        c.close()
        await h.assert_released()
        await assert_still_serving(h, h.server.port)


async def test_first_frame_must_be_settings():
    async with Native() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        c = Client(reader, writer)
        c.send(frame(PING, 0, 0, b"12345678"), raw=b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert await goaway_code(c) == PROTOCOL_ERROR
        c.close()
        await assert_still_serving(h, h.server.port)


async def test_goaway_names_the_last_stream_and_releases_open_ones():
    async with Native() as h:
        c = await handshake(h.server.port)
        c.open_stream(1, headers_msg(), body_msg(completion(), True))  # routed, stream left open
        await c.sync()
        assert sum(h.in_flight()) == 1
        _open(c, 1)  # HEADERS again on stream 1 (open, not ended): trailers without END_STREAM
        await c.until(lambda f: f[0] == RST_STREAM and f[2] == 1 and U32.unpack(f[3])[0] == PROTOCOL_ERROR)
        await h.assert_released()
        _open(c, 3)
        _open(c, 1)  # now a reused id
        f = await c.until(lambda f: f[0] == GOAWAY)
        assert U32.unpack_from(f[3])[0] == 3 and U32.unpack_from(f[3], 4)[0] == PROTOCOL_ERROR
        c.close()
        await h.assert_released()


# ------------------------------------------------------------------ stream errors: RST_STREAM
async def test_stream_errors_get_rst_stream_and_the_connection_lives_on():
    async with Native() as h:
        c = await handshake(h.server.port)
        c.open_stream(1, headers_msg())
        c.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(0)))  # a zero increment on a stream
        await c.until(lambda f: f[0] == RST_STREAM and f[2] == 1 and U32.unpack(f[3])[0] == PROTOCOL_ERROR)
        c.open_stream(3, headers_msg())
        c.send(frame(PRIORITY, 0, 3, b"\x00" * 4))  # PRIORITY of 4 bytes: a stream error (RFC 9113 6.3)
        await c.until(lambda f: f[0] == RST_STREAM and f[2] == 3 and U32.unpack(f[3])[0] == FRAME_SIZE_ERROR)
        await h.assert_released()
        c.open_stream(5, headers_msg(method="GET", eos=True), end=True)  # same connection: still served
        assert (await c.trailers(5))["grpc-status"] == "0"
        destination(c.messages(5)[0])
        c.close()
        await h.assert_released()


async def test_data_after_end_stream_is_a_stream_error():
    async with Native(FLOW_CONTROL) as h:  # the request waits in the queue: the stream stays open
        c = await handshake(h.server.port)
        c.open_stream(1, headers_msg(), body_msg(completion(), True), end=True)
        await until(lambda: h.admission.queue_size == 1, 10.0)
        c.send(frame(DATA, 0, 1, b"late"))
        await c.until(lambda f: f[0] == RST_STREAM and f[2] == 1 and U32.unpack(f[3])[0] == STREAM_CLOSED)
        await h.assert_released()
        c.close()


async def test_max_concurrent_streams_is_enforced_with_refused_stream():
    # queued requests keep their streams open
    async with Native(FLOW_CONTROL) as h, h2_server(h, max_concurrent_streams=2) as (server, port):
        c = await handshake(port)
        settings = next(f for f in c.frames if f[0] == SETTINGS and not f[1] & 1)
        assert (3, 2) in [struct.unpack_from(">HI", settings[3], i) for i in range(0, len(settings[3]), 6)]
        for sid in (1, 3, 5):
            c.open_stream(sid, headers_msg(), body_msg(completion(), True))
        await c.until(lambda f: f[0] == RST_STREAM and f[2] == 5 and U32.unpack(f[3])[0] == REFUSED_STREAM)
        await until(lambda: h.admission.queue_size == 2, 10.0)  # the refused stream never reached the picker
        c.send(frame(RST_STREAM, 0, 1, U32.pack(8)))  # one ends: room for a new one
        await c.sync()
        c.open_stream(7, headers_msg(), body_msg(completion(), True))
        await c.sync()
        assert not [f for f in c.frames if f[0] == RST_STREAM and f[2] == 7]
        c.close()
        await h.assert_released()


# ------------------------------------------------------------------ timeouts
async def test_handshake_timeout_closes_a_silent_connection():
    async with Native() as h, h2_server(h, handshake_timeout=0.2) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PRI * HTTP/2.0\r\n")  # half a preface, then nothing
        await asyncio.wait_for(reader.read(), 5)  # returns at EOF: the server gave up
        writer.close()
        await until(lambda: not server.connections, 10.0)
        await assert_still_serving(h, port)


async def test_idle_timeout_sends_goaway_and_closes():
    async with Native() as h, h2_server(h, idle_timeout=0.3) as (server, port):
        c = await handshake(port)
        c.open_stream(1, headers_msg(method="GET", eos=True), end=True)
        assert (await c.trailers(1))["grpc-status"] == "0"
        start = time.monotonic()
        assert await goaway_code(c) == NO_ERROR
        assert time.monotonic() - start >= 0.2
        c.close()
        await h.assert_released()


# ------------------------------------------------------------------ back-pressure and buffering
async def test_a_peer_that_does_not_read_stops_the_server_reading():
    """Finding 3: replies for a peer that never reads piled up without limit; now reading
    pauses while the socket's write buffer is over the high-water mark."""
    async with Native() as h:
        high = 256 * 1024
        async with h2_server(h, write_high_water=high, write_low_water=64 * 1024) as (server, port):
            c = await Client.connect(port, settings=((0x4, 0x7FFFFFFF),))  # a huge stream window ...
            c.send(frame(WINDOW_UPDATE, 0, 0, U32.pack(0x7FFFFFFF - 65535)))  # ... and connection window
            body = completion(prompt="p" * 200_000)
            streams = 60  # 12 MB of replies (each body comes back in streamed_response chunks)
            for i in range(streams):
                c.open_stream(2 * i + 1, headers_msg(), body_msg(body, True))
            (conn,) = server.connections
            await until(lambda: not conn.transport.is_reading(), 10.0)  # it read until its buffer passed the mark
            buffered = conn.transport.get_write_buffer_size()
            assert buffered < high + 2 * (len(body) + 4096) * 2  # at most the mark plus what one read produced
            # a reader appears: everything is delivered and every stream is routed
            c.send(frame(PING, 0, 0, b"lastping"))
            await c.until(lambda f: f[0] == PING and f[1] & 1 and f[3] == b"lastping")
            for i in range(streams):
                assert c.messages(2 * i + 1), f"stream {2 * i + 1} was not answered"
            c.close()
            await h.assert_released()


class _Transport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def close(self) -> None:
        pass

    abort = close


async def test_a_frame_arriving_in_small_pieces_is_not_copied_again_and_again():
    """Finding 3: each piece was appended by copying everything received so far (quadratic)."""
    async with Native() as h:
        conn = H2Connection(h.server)
        transport = _Transport()
        conn.connection_made(transport)
        conn.data_received(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 30))
                           + frame(WINDOW_UPDATE, 0, 0, U32.pack(1 << 30)))
        conn.data_received(frame(HEADERS, END_HEADERS, 1, request_block()))
        body = completion(prompt="z" * 1_000_000)
        data = frame(DATA, END_STREAM, 1, grpc_message(headers_msg()) + grpc_message(body_msg(body, True)))
        pieces = [data[i:i + 64] for i in range(0, len(data), 64)]
        buf = conn.buf
        start = time.thread_time()
        for piece in pieces[:-1]:
            conn.data_received(piece)
        assert conn.buf is buf and len(buf) == len(data) - len(pieces[-1])  # one buffer, grown in place
        conn.data_received(pieces[-1])
        elapsed = time.thread_time() - start
        assert not conn.buf
        assert transport.written > len(body)  # routed: the body went back in streamed_response chunks
        assert elapsed < 2.0, f"{elapsed:.2f}s of CPU for one 1 MB frame in 64-byte pieces"
        conn.connection_lost(None)
        await h.assert_released()
