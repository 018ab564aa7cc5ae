"""HttpGetClient against real servers on 127.0.0.1: aiohttp (Content-Length), raw asyncio
servers (chunked at awkward splits, idle closes, stalls, read-until-close), plus the
response parser fed at every split point."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from bench.scrape_cost import realistic_vllm_page
from devstack.launch import free_port
from epp.datalayer import MetricsCollector
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.datalayer.httpget import (
    BodyTooLarge,
    ConnectionClosed,
    HttpGetClient,
    ProtocolError,
    ResponseParser,
    StatusError,
)
from tests.servers import RawServer, eventually, length_response

PAGE = realistic_vllm_page()

@contextlib.asynccontextmanager
async def serving(respond, **client_options) -> AsyncIterator[tuple[RawServer, HttpGetClient]]:
    """A RawServer and a client of it, both closed on the way out."""
    async with RawServer(respond) as server:
        client = HttpGetClient("127.0.0.1", server.port, **client_options)
        try:
            yield server, client
        finally:
            await client.close()


def chunked_response(body: bytes, sizes: tuple[int, ...] = (1, 7, 300, 4096, 2, 65)) -> bytes:
    """Chunks of varied sizes, upper- and lower-case hex, extensions, and a trailer."""
    out = bytearray(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
    i = k = 0
    while i < len(body):
        piece = body[i:i + sizes[k % len(sizes)]]
        i, k = i + len(piece), k + 1
        size = b"%X" % len(piece) if k % 2 else b"%x" % len(piece)
        out += size + (b";note=x" if k % 3 == 0 else b"") + b"\r\n" + piece + b"\r\n"
    out += b"0\r\nX-Checksum: done\r\n\r\n"
    return bytes(out)


async def write_in_pieces(writer: asyncio.StreamWriter, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in [*cuts, len(data)]:
        writer.write(data[last:cut])
        await writer.drain()
        await asyncio.sleep(0)  # let each piece leave as its own segment
        last = cut


def awkward_cuts(wire: bytes, limit: int = 400) -> list[int]:
    """Between every CR and LF, inside chunk-size digits and the head's blank line."""
    cuts = {i + 1 for i in range(len(wire) - 1) if wire[i:i + 2] == b"\r\n"}
    cuts |= {i + 2 for i in range(len(wire) - 2) if wire[i:i + 1] == b"\n" and wire[i + 1:i + 3].isalnum()}
    return sorted(c for c in cuts if 0 < c < len(wire))[:limit]


@pytest.fixture
async def aiohttp_server():
    state = {"status": 200, "body": PAGE, "headers": []}

    async def handle(request: web.Request) -> web.Response:
        state["headers"].append(dict(request.headers))
        return web.Response(status=state["status"], body=state["body"], content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port, state
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------- real servers
async def test_content_length_keep_alive_status_and_request_headers(aiohttp_server):
    port, state = aiohttp_server
    client = HttpGetClient("127.0.0.1", port, headers={"Accept": "text/plain"})
    try:
        for _ in range(5):
            resp = await client.get("/metrics")
            assert (resp.status, resp.body, resp.keep_alive) == (200, PAGE, True)
        assert client.connects == 1  # one kept-alive connection for all five
        sent = state["headers"][0]
        assert sent["Host"] == f"127.0.0.1:{port}" and sent["Accept-Encoding"] == "identity"
        assert sent["Accept"] == "text/plain"

        state["status"], state["body"] = 503, b"overloaded"
        resp = await client.get("/metrics")
        assert (resp.status, resp.reason, resp.body) == (503, "Service Unavailable", b"overloaded")
        with pytest.raises(StatusError, match="503"):
            resp.raise_for_status()
        resp = await client.get("/nope")
        assert resp.status == 404
        assert client.connects == 1  # an error status with a body keeps the connection usable
    finally:
        await client.close()


async def test_chunked_split_at_awkward_boundaries_then_keep_alive():
    bodies = [PAGE, b"x", PAGE[:5000]]

    async def respond(_reader, writer, _conn, n, _head):
        wire = chunked_response(bodies[n % len(bodies)])
        await write_in_pieces(writer, wire, awkward_cuts(wire))
        return True

    async with serving(respond) as (server, client):
        for i in range(len(bodies)):
            resp = await client.get("/metrics")
            assert resp.body == bodies[i] and resp.headers["transfer-encoding"] == "chunked"
        assert client.connects == 1 and server.accepted == 1
        await client.close()
        await eventually(lambda: server.open == 0, "the client's close seen by the server")


async def test_byte_at_a_time_head_and_connection_close_bodies():
    """A response trickled one byte per write; then `Connection: close` and read-until-close
    bodies, each of which costs the client its connection (and it reconnects)."""

    async def respond(_reader, writer, conn, _n, _head):
        if conn == 0:
            wire = length_response(b"hello", extra=b"X-Slow: yes\r\n")
            await write_in_pieces(writer, wire, list(range(1, len(wire))))
            return True
        if conn == 1:
            writer.write(length_response(b"bye", extra=b"Connection: close\r\n"))
            await writer.drain()
            return True  # but leaves the socket open: the client must not send on it again
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + PAGE)  # no length: until close
        await writer.drain()
        return False

    async with serving(respond) as (server, client):
        resp = await client.get("/a")
        assert (resp.body, resp.headers["x-slow"], resp.keep_alive) == (b"hello", "yes", True)
        await client.close()  # next request on a new connection: conn 1
        resp = await client.get("/b")
        assert (resp.body, resp.keep_alive) == (b"bye", False)
        resp = await client.get("/c")
        assert (resp.body, resp.keep_alive) == (PAGE, False)
        assert client.connects == 3
        await eventually(lambda: server.open == 0, "every connection closed")


async def test_reconnects_when_the_server_closed_an_idle_connection():
    """Each connection answers one request; a second request on it is met with a close and
    no answer, as when a server's idle timeout races the next scrape."""

    async def respond(_reader, writer, _conn, n, _head):
        if n > 0:
            return False  # close without a byte
        writer.write(length_response(PAGE))
        await writer.drain()
        return True

    async with serving(respond) as (server, client):
        assert (await client.get("/metrics")).body == PAGE
        resp = await client.get("/metrics")  # reused connection dies unanswered: retried fresh
        assert resp.body == PAGE and client.connects == 2
        # The server closed the idle connection and the client already saw it: plain reconnect.
        async def close_idle(_reader, writer, _conn, n, _head):
            writer.write(length_response(b"ok", extra=b"Connection: keep-alive\r\n"))
            await writer.drain()
            return False  # close right after answering

        server.respond = close_idle
        assert (await client.get("/metrics")).body == b"ok"  # answered, then closed by the server
        await eventually(lambda: server.open == 0, "server closed the connection")
        assert (await client.get("/metrics")).body == b"ok"
        assert client.connects == 3


def first_answered(*, then_stall: bool):
    """A respond hook: the first request on the first connection is answered "first"; every
    later one is closed unanswered, at once or (then_stall) once the client hangs up."""

    async def respond(reader, writer, conn, n, _head):
        if conn == 0 and n == 0:
            writer.write(length_response(b"first"))
            await writer.drain()
            return True
        if then_stall:
            await reader.read()  # stall until the client hangs up
        return False

    return respond


async def test_retries_only_once():
    async with serving(first_answered(then_stall=False)) as (server, client):
        assert (await client.get("/")).body == b"first"
        with pytest.raises(ConnectionClosed, match="without a response"):
            await client.get("/")  # reused fails, one fresh retry fails, then it gives up
        assert server.accepted == 2
        with pytest.raises(ConnectionClosed):
            await client.get("/")  # a fresh connection failing is not retried
        assert server.accepted == 3
        await eventually(lambda: server.open == 0, "no connection left open")


async def test_timeouts_drop_the_connection_and_use_each_requests_own_deadline():
    stall = {"on": False}

    async def respond(reader, writer, _conn, _n, head):
        if stall["on"]:
            if b"/partial" in head:  # head and half the body, then nothing
                wire = length_response(PAGE)
                writer.write(wire[:len(wire) // 2])
                await writer.drain()
            await reader.read()  # hang until the client hangs up
            return False
        writer.write(length_response(b"fast"))
        await writer.drain()
        return True

    async with serving(respond, timeout=5.0) as (server, client):
        for _ in range(3):  # arms the client's timer for ~5 s from now
            assert (await client.get("/")).body == b"fast"
        stall["on"] = True
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="timed out"):
            await client.get("/", timeout=0.3)  # shorter than the armed timer: must not wait 5 s
        took = time.monotonic() - t0
        assert 0.29 <= took < 3.0, took
        await eventually(lambda: server.open == 0, "the timed-out connection closed by the client")

        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.get("/partial", timeout=0.3)
        assert 0.29 <= time.monotonic() - t0 < 3.0
        await eventually(lambda: server.open == 0, "the half-read connection closed by the client")

        stall["on"] = False
        assert (await client.get("/")).body == b"fast"  # and it recovers on a new connection
        assert client.connects == 3


async def test_oversize_bodies_are_refused_and_the_connection_dropped(aiohttp_server):
    port, _ = aiohttp_server
    client = HttpGetClient("127.0.0.1", port, max_body=10_000)
    try:
        with pytest.raises(BodyTooLarge, match=f"body of {len(PAGE)} bytes exceeds 10000"):
            await client.get("/metrics")
        assert (await client.get("/metrics", max_body=len(PAGE))).body == PAGE  # exactly at the cap
        assert client.connects == 2
    finally:
        await client.close()

    async def respond(_reader, writer, conn, _n, _head):
        if conn == 0:
            writer.write(chunked_response(PAGE))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + PAGE)
        await writer.drain()
        return True

    async with serving(respond, max_body=10_000) as (server, client):
        with pytest.raises(BodyTooLarge, match="exceeds 10000 bytes"):
            await client.get("/chunked")
        with pytest.raises(BodyTooLarge, match="exceeds 10000 bytes"):
            await client.get("/until-close")
        await eventually(lambda: server.open == 0, "both refused connections closed")


async def test_protocol_errors_and_refused_connections():
    answers = [b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
               b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"]

    async def respond(_reader, writer, conn, _n, _head):
        writer.write(answers[conn])
        await writer.drain()
        return True

    async with serving(respond) as (server, client):
        for expected in ("bad status line 'SSH-2.0", "bad chunk size line b'zz'", "Content-Encoding 'gzip'"):
            with pytest.raises(ProtocolError, match=expected):
                await client.get("/")
        await eventually(lambda: server.open == 0, "every broken connection closed")
    with pytest.raises(OSError):
        await HttpGetClient("127.0.0.1", free_port()).get("/")
    with pytest.raises(ValueError, match="port"):
        HttpGetClient("127.0.0.1", 0)
    with pytest.raises(ValueError, match="path"):
        await HttpGetClient("127.0.0.1", 1).get("metrics")


async def test_http10_server_of_prometheus_client():
    """prometheus_client's own exposition server answers HTTP/1.0 and closes each connection."""
    registry = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "Waiting.", ["model_name"], registry=registry).labels("m").set(3)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    client = HttpGetClient("127.0.0.1", port)
    try:
        for _ in range(2):
            resp = await client.get("/metrics")
            assert resp.status == 200 and not resp.keep_alive
            assert b'vllm:num_requests_waiting{model_name="m"} 3.0' in resp.body
        assert client.connects == 2
    finally:
        await client.close()
        await asyncio.to_thread(server.shutdown)
        server.server_close()


async def test_one_request_at_a_time_and_close_waits_for_the_socket(aiohttp_server):
    port, _ = aiohttp_server
    client = HttpGetClient("127.0.0.1", port)
    first = asyncio.ensure_future(client.get("/metrics"))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one request at a time"):
        await client.get("/metrics")
    assert (await first).body == PAGE
    sock = client._conn.transport.get_extra_info("socket")
    await client.close()
    assert sock.fileno() == -1  # closed by the time close() returns


async def test_close_during_a_request_fails_it_without_a_retry():
    async with serving(first_answered(then_stall=True)) as (server, client):
        assert (await client.get("/")).body == b"first"
        pending = asyncio.ensure_future(client.get("/"))
        await eventually(lambda: len(server.requests) == 2, "the second request at the server")
        await client.close()
        with pytest.raises(ConnectionClosed):
            await pending
        await eventually(lambda: server.open == 0, "no connection left open")
        assert server.accepted == 1  # the cut request was not retried on a new connection

        pending = asyncio.ensure_future(client.get("/"))
        await asyncio.sleep(0)  # the request is now inside connect
        await client.close()
        with pytest.raises(ConnectionClosed, match="closed while connecting"):
            await pending
        await eventually(lambda: server.open == 0, "the connection made after close() closed as well")


async def test_collector_keeps_one_connection_per_endpoint_and_closes_it():
    async def respond(_reader, writer, _conn, _n, _head):
        writer.write(length_response(PAGE))
        await writer.drain()
        return True

    servers = [await RawServer(respond).start() for _ in range(2)]
    ds = Datastore()
    ds.replace_all([EndpointSpec(name=f"s{i}", address="127.0.0.1", port=s.port) for i, s in enumerate(servers)])
    collector = MetricsCollector(ds, interval=0.01, timeout=1.0)
    await collector.start()
    try:
        await eventually(lambda: all(len(s.requests) >= 5 for s in servers), "several scrapes of each")
        assert all(e.metrics.ok and e.metrics.num_gpu_blocks == 27400 for e in ds.endpoints())
        assert [s.accepted for s in servers] == [1, 1]  # keep-alive: one connection each
        assert b"Accept-Encoding: identity" in servers[0].requests[0]
        ds.remove("s1")
        await eventually(lambda: servers[1].open == 0, "the removed endpoint's connection closed")
        assert servers[0].open == 1
        await collector.stop()
        await eventually(lambda: servers[0].open == 0, "the last connection closed on stop")
    finally:
        await collector.stop()
        for s in servers:
            await s.stop()


# ---------------------------------------------------------------------------- parser
def parse_in_pieces(wire: bytes, cuts: list[int], max_body: int = 1 << 20):
    parser = ResponseParser(max_body)
    last, resp = 0, None
    for cut in [*cuts, len(wire)]:
        assert resp is None, "complete before the last byte"
        resp = parser.feed(wire[last:cut])
        last = cut
    return resp, parser


def test_parser_every_two_way_split_of_a_chunked_response():
    body = PAGE[:700]
    wire = chunked_response(body, sizes=(1, 2, 17, 300))
    for cut in range(1, len(wire)):
        resp, parser = parse_in_pieces(wire, [cut])
        assert resp is not None and resp.body == body and not parser.buf, cut
    resp, _ = parse_in_pieces(wire, list(range(1, len(wire))))  # byte by byte
    assert resp is not None and resp.body == body and resp.keep_alive


def test_parser_framing_rules():
    # Interim 100 Continue, then the real answer; repeated fields joined.
    resp, _ = parse_in_pieces(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nVia: a\r\nVIA: b\r\n"
                              b"Content-Length: 2\r\n\r\nok", [])
    assert (resp.status, resp.headers["via"], resp.body) == (200, "a, b", b"ok")
    resp, _ = parse_in_pieces(b"HTTP/1.1 204 No Content\r\n\r\n", [])
    assert (resp.status, resp.body, resp.keep_alive) == (204, b"", True)
    resp, _ = parse_in_pieces(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: Keep-Alive\r\n\r\nx", [])
    assert resp.keep_alive
    resp, parser = parse_in_pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxEXTRA", [])
    assert resp.body == b"x" and parser.buf == b"EXTRA"  # the connection then refuses to reuse it
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\n\r\npartial") is None
    assert parser.feed_eof().body == b"partial"
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort") is None
    with pytest.raises(ConnectionClosed):
        parser.feed_eof()
    for bad, message in [(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
                         (b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n", "bad header line"),
                         (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
                         (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", "not followed by CRLF"),
                         (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000, "exceeds 4096")]:
        with pytest.raises(ProtocolError, match=message):
            ResponseParser().feed(bad)
    with pytest.raises(ProtocolError, match="head exceeds"):
        ResponseParser().feed(b"HTTP/1.1 200 OK\r\n" + b"X-Big: y\r\n" * 8000)
    with pytest.raises(BodyTooLarge, match="body exceeds 10 bytes"):
        ResponseParser(10).feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n6\r\n")
