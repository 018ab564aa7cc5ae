"""The native ext_proc transport (epp.handlers.h2.server) at the HTTP/2 frame level, over real
sockets: HPACK (RFC 7541 vectors), SETTINGS/PING, HEADERS + CONTINUATION with PADDED and
PRIORITY flags and a dynamic-table :path, send-side flow control, gRPC framing errors,
RST_STREAM / connection loss (nothing leaks), graceful GOAWAY, TLS with ALPN h2.
(The protocol replays in test_extproc_protocol.py also run over it, with a grpc client.)"""

from __future__ import annotations

import asyncio
import random
import struct

import grpc
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub

from epp.handlers.h2.frames import PREFACE
from epp.handlers.h2.hpack import Decoder, HpackError, encode_literal, huffman_decode, huffman_encode
from epp.handlers.h2.server import H2GrpcServer, ssl_context
from epp.handlers.protocol import METHOD_PATH
from epp.tls import self_signed
from tests.extproc import (
    FLOW_CONTROL,
    Harness,
    body_msg,
    completion,
    destination,
    headers_msg,
    streamed,
)

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
U32 = struct.Struct(">I")


# ------------------------------------------------------------------ HPACK
def test_hpack_rfc7541_c4_requests_with_huffman_and_dynamic_table():
    d = Decoder()
    h = bytes.fromhex
    assert d.decode(h("828684418cf1e3c2e5f23a6ba0ab90f4ff")) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")]
    assert d.decode(h("828684be5886a8eb10649cbf"))[-1] == ("cache-control", "no-cache")
    assert d.decode(h("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))[-1] == ("custom-key", "custom-value")
    assert d.size == 164  # RFC 7541 C.4.3
    assert d.decode(b"\x20") == [] and d.size == 0  # table size update to 0 evicts everything
    with pytest.raises(HpackError):
        d.decode(b"\xbe")  # that entry is gone


def test_hpack_repeated_blocks_follow_table_changes():
    d = Decoder()
    d.decode(b"\x3f\xe1\x1f" + b"\x40\x01a\x011")  # size update to 4096, then a: 1 indexed
    assert d.decode(b"\xbe") == [("a", "1")]
    assert d.decode(b"\xbe") == [("a", "1")]  # a repeated block (served from the block cache)
    d.decode(b"\x40\x01b\x012")  # a new entry shifts index 62
    assert d.decode(b"\xbe") == [("b", "2")]


def test_huffman_round_trip_and_bad_padding():
    rng = random.Random(7)
    for _ in range(500):
        s = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
        assert huffman_decode(huffman_encode(s)) == s
    assert huffman_encode(b"www.example.com").hex() == "f1e3c2e5f23a6ba0ab90f4ff"
    with pytest.raises(HpackError):
        huffman_decode(b"\xf1\x00")  # padding must be ones
    with pytest.raises(HpackError):
        Decoder().decode(b"\x3f\xe2\x1f")  # a table size update over the 4096 limit


# ------------------------------------------------------------------ a raw HTTP/2 client
def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, ftype, flags)) + U32.pack(sid) + payload


def grpc_message(msg: ProcessingRequest, compressed: int = 0) -> bytes:
    data = msg.SerializeToString()
    return bytes((compressed,)) + U32.pack(len(data)) + data


def request_block(path: str = METHOD_PATH) -> bytes:
    return b"".join(encode_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "epp"),
        ("content-type", "application/grpc"), ("te", "trailers")))


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = Decoder()
        self.data: dict[int, bytearray] = {}
        self.headers: dict[int, list[list[tuple[str, str]]]] = {}
        self.frames: list[tuple[int, int, int, bytes]] = []

    @classmethod
    async def connect(cls, port: int, settings: tuple[tuple[int, int], ...] = ()) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        c.send(frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in settings)), raw=PREFACE)
        return c

    def send(self, data: bytes, raw: bytes = b"") -> None:
        self.writer.write(raw + data)

    def open_stream(self, sid: int, *msgs: ProcessingRequest, path: str = METHOD_PATH, end: bool = False) -> None:
        self.send(frame(HEADERS, END_HEADERS, sid, request_block(path)))
        if msgs or end:
            self.send(frame(DATA, END_STREAM if end else 0, sid, b"".join(grpc_message(m) for m in msgs)))

    async def read_frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 10)
        n = (head[0] << 16) | (head[1] << 8) | head[2]
        payload = await asyncio.wait_for(self.reader.readexactly(n), 10) if n else b""
        f = (head[3], head[4], U32.unpack_from(head, 5)[0] & 0x7FFFFFFF, payload)
        self.frames.append(f)
        ftype, flags, sid, payload = f
        if ftype == DATA:
            self.data.setdefault(sid, bytearray()).extend(payload)
        elif ftype == HEADERS:
            self.headers.setdefault(sid, []).append(self.decoder.decode(payload))
        return f

    async def until(self, pred) -> tuple[int, int, int, bytes]:
        while True:
            f = await self.read_frame()
            if pred(f):
                return f

    async def sync(self) -> None:
        """PING round trip: everything the server had to send before it has arrived."""
        self.send(frame(PING, 0, 0, b"syncsync"))
        await self.until(lambda f: f[0] == PING and f[1] & ACK and f[3] == b"syncsync")

    async def trailers(self, sid: int) -> dict[str, str]:
        await self.until(lambda f: f[0] == HEADERS and f[2] == sid and f[1] & END_STREAM)
        return dict(self.headers[sid][-1])

    def messages(self, sid: int) -> list[ProcessingResponse]:
        buf, out, pos = bytes(self.data.get(sid, b"")), [], 0
        while pos + 5 <= len(buf):
            n = U32.unpack_from(buf, pos + 1)[0]
            out.append(ProcessingResponse.FromString(buf[pos + 5:pos + 5 + n]))
            pos += 5 + n
        return out

    def close(self) -> None:
        self.writer.close()


class Native(Harness):
    transport = "native"


# ------------------------------------------------------------------ frame-level tests
async def test_settings_ping_continuation_padding_and_dynamic_table_path():
    async with Native() as h:
        c = await Client.connect(h.server.port)
        first = await c.read_frame()
        assert first[0] == SETTINGS and not first[1] & ACK
        await c.until(lambda f: f[0] == SETTINGS and f[1] & ACK)  # ours acknowledged
        c.send(frame(PING, 0, 0, b"12345678"))
        await c.until(lambda f: f[0] == PING and f[1] & ACK and f[3] == b"12345678")

        # :path as a Huffman literal with incremental indexing, split over HEADERS (PADDED +
        # PRIORITY) and CONTINUATION; the body in a PADDED DATA frame.
        block = (encode_literal(":method", "POST") + b"\x44" + bytes((0x80 | len(huffman_encode(METHOD_PATH.encode())),))
                 + huffman_encode(METHOD_PATH.encode()) + encode_literal("content-type", "application/grpc"))
        pad = b"\x00" * 7
        c.send(frame(HEADERS, PADDED | PRIORITY_FLAG, 1, bytes((len(pad),)) + b"\x00\x00\x00\x00\x10" + block[:9] + pad))
        c.send(frame(CONTINUATION, END_HEADERS, 1, block[9:]))
        data = grpc_message(headers_msg()) + grpc_message(body_msg(completion(), True))
        c.send(frame(DATA, PADDED, 1, b"\x03" + data + b"\x00\x00\x00"))
        await c.sync()
        hdr, chunk = c.messages(1)
        header, _ = destination(hdr)
        assert streamed(chunk) == (completion(), True)
        assert h.in_flight().count(1) == 1

        # stream 3 names the path by its dynamic-table index (62): only a decoder that kept
        # the table in sync routes it; a path that is not ext_proc's gets UNIMPLEMENTED.
        c.send(frame(HEADERS, END_HEADERS, 3, encode_literal(":method", "POST") + b"\xbe"
                     + encode_literal("content-type", "application/grpc")))
        c.send(frame(DATA, END_STREAM, 3, grpc_message(headers_msg(method="GET", eos=True))))
        c.open_stream(5, path="/envoy.service.ext_proc.v3.ExternalProcessor/Other", end=True)
        assert (await c.trailers(3))["grpc-status"] == "0"
        destination(c.messages(3)[0])
        t5 = await c.trailers(5)
        assert t5["grpc-status"] == "12" and "Other" in t5["grpc-message"]
        c.send(frame(RST_STREAM, 0, 1, U32.pack(8)))  # CANCEL: as Envoy when the client goes away
        await h.assert_released()
        c.close()


async def test_send_flow_control_waits_for_window_updates_and_respects_max_frame():
    async with Native() as h:
        # stream window 1000 (SETTINGS_INITIAL_WINDOW_SIZE); connection window stays 65535
        c = await Client.connect(h.server.port, settings=((0x4, 1000), (0x5, 16384)))
        prompt = "".join(chr(97 + i % 26) for i in range(210_000))
        body = completion(prompt=prompt)
        c.open_stream(1, headers_msg(), body_msg(body, True))
        await c.sync()
        assert len(c.data[1]) == 1000  # exactly the stream window, then it waits
        c.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(10_000_000)))
        await c.sync()
        assert len(c.data[1]) == 65535  # now the connection window is the limit
        c.send(frame(WINDOW_UPDATE, 0, 0, U32.pack(10_000_000)))
        await c.sync()
        replies = c.messages(1)
        destination(replies[0])
        assert b"".join(streamed(r)[0] for r in replies[1:]) == body
        assert max(len(f[3]) for f in c.frames if f[0] == DATA) <= 16384
        c.send(frame(DATA, END_STREAM, 1))
        assert (await c.trailers(1))["grpc-status"] == "0"
        await h.assert_released()
        c.close()


@pytest.mark.parametrize(("compressed", "status", "max_message"), [(1, "12", None), (0, "8", 1000)])
async def test_compressed_or_oversized_messages_are_refused(compressed, status, max_message):
    async with Native() as h:
        if max_message:
            h.server.max_message = max_message
        c = await Client.connect(h.server.port)
        c.open_stream(1)
        c.send(frame(DATA, 0, 1, grpc_message(headers_msg()) + grpc_message(
            body_msg(completion(prompt="x" * 2000), True), compressed=compressed)))
        t = await c.trailers(1)
        assert t["grpc-status"] == status and t["grpc-message"]
        await h.assert_released()
        c.close()


async def test_rst_stream_and_connection_loss_release_queued_and_routed_requests():
    async with Native(FLOW_CONTROL) as h:
        # no scraped metrics: the pool counts as saturated, so requests wait in the queue
        c = await Client.connect(h.server.port)
        c.open_stream(1, headers_msg(), body_msg(completion(), True))
        c.open_stream(3, headers_msg(), body_msg(completion(), True))
        for _ in range(500):
            if h.admission.queue_size == 2:
                break
            await asyncio.sleep(0.01)
        assert h.admission.queue_size == 2
        c.send(frame(RST_STREAM, 0, 1, U32.pack(8)))
        for _ in range(500):
            if h.admission.queue_size == 1:
                break
            await asyncio.sleep(0.01)
        assert h.admission.queue_size == 1
        c.close()  # connection lost with stream 3 still queued
        await h.assert_released()
    async with Native() as h:
        c = await Client.connect(h.server.port)
        c.open_stream(1, headers_msg(), body_msg(completion(), True))
        await c.sync()
        assert sum(h.in_flight()) == 1
        c.close()  # routed, then the connection drops
        await h.assert_released()


async def test_graceful_goaway_finishes_in_flight_streams_and_refuses_new_ones():
    async with Native() as h:
        c = await Client.connect(h.server.port)
        c.open_stream(1, headers_msg(), body_msg(completion(), True))
        await c.sync()
        assert sum(h.in_flight()) == 1
        stop = asyncio.get_running_loop().create_task(h.server.stop(grace=30))
        first = await c.until(lambda f: f[0] == GOAWAY)
        assert U32.unpack_from(first[3])[0] == 0x7FFFFFFF
        ping = await c.until(lambda f: f[0] == PING and not f[1] & ACK)
        c.open_stream(3, headers_msg(method="GET", eos=True))  # opened before the client saw the PING: served
        c.send(frame(PING, ACK, 0, ping[3]))
        final = await c.until(lambda f: f[0] == GOAWAY)
        assert U32.unpack_from(final[3])[0] == 3
        c.open_stream(5, headers_msg(method="GET", eos=True))
        await c.until(lambda f: f[0] == RST_STREAM and f[2] == 5)  # REFUSED_STREAM
        destination(c.messages(3)[0])
        assert not stop.done()
        c.send(frame(DATA, END_STREAM, 1))
        c.send(frame(DATA, END_STREAM, 3))
        assert (await c.trailers(1))["grpc-status"] == "0"
        await asyncio.wait_for(c.reader.read(), 10)  # returns at EOF: the server closed the connection
        await asyncio.wait_for(stop, 10)
        await h.assert_released()
        c.close()


async def test_bad_preface_gets_goaway_protocol_error():
    async with Native() as h:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        goaway = data.find(bytes((GOAWAY,)) + b"\x00" + U32.pack(0))
        assert goaway >= 3 and U32.unpack_from(data, goaway + 6 + 4)[0] == 1  # PROTOCOL_ERROR
        writer.close()


async def test_tls_with_alpn_h2_and_a_grpc_client():
    cert, key = self_signed("localhost")
    async with Native() as h:
        await h.server.stop(0)
        tls = H2GrpcServer(h.ext_proc, ssl_context=ssl_context(cert, key))
        port = await tls.start("127.0.0.1", 0)
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                           options=(("grpc.ssl_target_name_override", "localhost"),)) as ch:
            call = ExternalProcessorStub(ch).Process()
            await call.write(headers_msg(method="GET", eos=True))
            header, meta = destination(await asyncio.wait_for(call.read(), 10))
            assert header == meta
            call.cancel()
        await tls.stop(1)
        await h.assert_released()


async def test_receive_windows_are_advertised_and_replenished():
    async with Native() as h:
        c = await Client.connect(h.server.port)
        settings = await c.until(lambda f: f[0] == SETTINGS and not f[1] & ACK)
        ours = dict(struct.unpack_from(">HI", settings[3], i) for i in range(0, len(settings[3]), 6))
        window = ours[0x4]  # SETTINGS_INITIAL_WINDOW_SIZE
        assert window >= 1 << 20 and ours[0x5] >= 16384
        conn = await c.until(lambda f: f[0] == WINDOW_UPDATE and f[2] == 0)
        assert U32.unpack(conn[3])[0] >= 1 << 20  # the connection window is raised at once
        # one message larger than the stream window, sent in frames of SETTINGS_MAX_FRAME_SIZE:
        # the server must return stream credit before the window runs out
        size = window + window // 2
        c.open_stream(1)
        c.send(frame(DATA, 0, 1, b"\x00" + U32.pack(size)))
        sent, chunk = 5, b"x" * ours[0x5]
        while sent + len(chunk) <= window:
            c.send(frame(DATA, 0, 1, chunk))
            sent += len(chunk)
        await c.sync()
        updates = sum(U32.unpack(f[3])[0] for f in c.frames if f[0] == WINDOW_UPDATE and f[2] == 1)
        assert updates >= window // 2  # room for the rest of the message
        c.send(frame(RST_STREAM, 0, 1, U32.pack(8)))
        await h.assert_released()
        c.close()


def test_transport_flags():
    from epp.options import parse_args

    o = parse_args(["--endpoints=10.0.0.1:8000"])
    assert (o.ext_proc_transport, o.api_port) == ("native", -1)
    assert parse_args(["--endpoints=10.0.0.1:8000", "--ext-proc-transport=grpcio"]).ext_proc_transport == "grpcio"
    o = parse_args(["--endpoints=10.0.0.1:8000", "--ext-proc-transport=native", "--api-port=0"])
    assert (o.ext_proc_transport, o.api_port) == ("native", 0)
    with pytest.raises(SystemExit):
        parse_args(["--endpoints=10.0.0.1:8000", "--ext-proc-transport=h3"])
