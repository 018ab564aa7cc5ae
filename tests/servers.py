"""Servers on 127.0.0.1 for the data-layer tests, and the one polling helper.

- `eventually`: poll (without blocking the loop) until a predicate holds.
- `RawServer`: an asyncio TCP server speaking whatever a `respond` coroutine writes.
- `HostileModelServer`: a model server that misbehaves on purpose (bad, huge and
  changing /metrics pages, hostile values, slowloris, bad status lines, huge
  Content-Length, a connection closed mid-body), switchable per scrape.

Every server listens on a free port (port 0) and `stop()` ends every connection and
handler task, so nothing outlives a test (use them as `async with`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

# respond(reader, writer, connection index, request index on that connection, request head)
# -> keep the connection open for another request?
Respond = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int, int, bytes], Awaitable[bool]]


async def eventually(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll until predicate() is truthy, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def length_response(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n" % (status.encode(), len(body), extra) + body


class RawServer:
    """Counts connections so tests can see the client's sockets open and close."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.accepted = 0
        self.open = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):  # a handler that trickles bytes forever
            t.cancel()
        await self._server.wait_closed()
        await eventually(lambda: self.open == 0, "the server's handlers to finish")
        self._server = None

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, self.accepted, self.open = self.accepted, self.accepted + 1, self.open + 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            n = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    break
                self.requests.append(head)
                if not await self.respond(reader, writer, index, n, head):
                    break
                n += 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            self.open -= 1


# ---------------------------------------------------------------------------- hostile model server
GOOD_PAGE = (b"# TYPE vllm:num_requests_waiting gauge\n"
             b'vllm:num_requests_waiting{model_name="m"} 2\n'
             b'vllm:num_requests_running{model_name="m"} 1\n'
             b'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
             b'vllm:cache_config_info{block_size="16",num_gpu_blocks="1000"} 1\n')

HOSTILE_VALUES_PAGE = (b'vllm:num_requests_waiting{model_name="a"} 1e308\n'
                       b'vllm:num_requests_waiting{model_name="b"} 1e308\n'
                       b'vllm:num_requests_running{model_name="m"} NaN\n'
                       b'vllm:kv_cache_usage_perc{model_name="m"} -Inf\n'
                       b'vllm:cache_config_info{block_size="16",num_gpu_blocks="-1"} 1\n')


class HostileModelServer(RawServer):
    """/metrics in one of these modes (set `mode` at any time; it applies per request):

    page            `page` (bytes), or `page_fn(n)` for a page that changes each scrape
    slow-body       a valid head, then the body one byte per `interval`
    slow-head       the head one byte per `interval`, never finishing it
    bad-status      a status code with a non-ASCII digit ("2\\xb200")
    garbage-status  a status line that is not HTTP at all
    huge-length     a 5,000-digit Content-Length
    close-mid-body  Content-Length 100,000, 10 bytes, then the connection closes
    """

    MODES = ("page", "slow-body", "slow-head", "bad-status", "garbage-status", "huge-length", "close-mid-body")

    def __init__(self, page: bytes = GOOD_PAGE, mode: str = "page", interval: float = 0.05) -> None:
        super().__init__(self._respond)
        self.page = page
        self.page_fn: Callable[[int], bytes] | None = None
        self.mode = mode
        self.interval = interval
        self.served = 0  # requests answered (in any mode)

    async def _trickle(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(self.interval)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _conn: int, _n: int,
                       _head: bytes) -> bool:
        if self.mode not in self.MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        n, self.served = self.served, self.served + 1
        mode = self.mode
        if mode == "page":
            page = self.page_fn(n) if self.page_fn is not None else self.page
            writer.write(length_response(page, extra=b"Content-Type: text/plain\r\n"))
            await writer.drain()
            return True
        if mode == "slow-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(self.page))
            await self._trickle(writer, self.page)
            return True
        if mode == "slow-head":
            await self._trickle(writer, b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (1 << 20))
            return False
        wire = {
            "bad-status": b"HTTP/1.1 2\xb20 OK\r\nContent-Length: 2\r\n\r\nok",
            "garbage-status": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            "huge-length": b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n" + b"x" * 100,
            "close-mid-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789",
        }[mode]
        writer.write(wire)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return False
