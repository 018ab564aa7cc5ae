"""A minimal asyncio HTTP/1.1 keep-alive GET client for one host:port.

The scraper GETs every endpoint's /metrics 20 times a second, so the per-request CPU
of a general client (aiohttp: ~400 us per 41 KB page besides extraction, see
bench.scrape_cost) becomes a visible background cost. This client does only what
scraping needs, on an asyncio Protocol: one request at a time on one kept-alive
connection, `Accept-Encoding: identity`, bodies framed by Content-Length, chunked
transfer coding or the connection's end, a body-size cap, one deadline per request
(connect included, enforced by one lazily re-armed timer), and one transparent retry
on a fresh connection when a reused one dies before any byte of the answer (the
server closed it while idle). Any failure drops the connection, so a socket is never
left half-read or open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl as _ssl

MAX_BODY = 16 << 20  # default body cap; a /metrics page is tens of KB
MAX_HEAD = 64 << 10  # status line + headers
_MAX_LINE = 4096  # chunk-size and trailer lines
_MAX_CACHED_REQUESTS = 16  # request bytes kept per path (the scraper asks for one path)
_MAX_LENGTH_DIGITS = 18  # a longer Content-Length is over any cap (and int() refuses 4,300+ digits)
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_NO_CRLF = re.compile(r"[^\r\n]*")

# parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_EOF = range(7)


class HttpError(Exception):
    """Base of this module's errors (a timeout raises the builtin TimeoutError)."""


class ProtocolError(HttpError):
    """The server's answer is not valid HTTP/1.x (or not what was asked for)."""


class BodyTooLarge(HttpError):
    """The body is, or announces to be, over the cap."""


class ConnectionClosed(HttpError, ConnectionError):
    """The server closed the connection before the response was complete."""


class StatusError(HttpError):
    """A complete response whose status is not the one wanted (see Response.raise_for_status)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}".rstrip())
        self.status = status
        self.reason = reason


@dataclasses.dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased; repeated fields joined with ", "
    body: bytes
    keep_alive: bool  # the connection may carry the next request

    def raise_for_status(self, expected: int = 200) -> None:
        if self.status != expected:
            raise StatusError(self.status, self.reason)


class ResponseParser:
    """Incremental parser of one response: feed() bytes as they come, in any split;
    it returns the Response once complete (and keeps any bytes past it in `buf`)."""

    __slots__ = ("max_body", "buf", "state", "need", "body", "status", "reason", "headers", "keep_alive",
                 "started")

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self.buf = bytearray()
        self.state = _HEAD
        self.need = 0  # bytes still expected (Content-Length body or current chunk)
        self.body = bytearray()
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.started = False  # any byte received

    def feed(self, data: bytes) -> Response | None:
        self.started = True
        buf = self.buf
        if not buf and self.state == _HEAD:
            # The usual case, a whole response in one read: slice the body out of `data`
            # instead of copying it through `buf` first.
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                start = end + 4
                if self._head(data[:end]):
                    buf += data[start:]
                    return self._done(b"")
                stop = start + self.need
                if self.state == _LENGTH and stop <= len(data):
                    buf += data[stop:]
                    return self._done(data[start:stop])
                data = data[start:]
        buf += data
        while True:
            state = self.state
            if state == _LENGTH:  # the common case first
                need = self.need
                if len(buf) < need:
                    return None
                with memoryview(buf) as view:
                    body = bytes(view[:need])
                del buf[:need]
                return self._done(body)
            if state == _HEAD:
                head = self._take(b"\r\n\r\n", MAX_HEAD, "response head")
                if head is None:
                    return None
                if self._head(head):
                    return self._done(b"")
            elif state == _CHUNK_SIZE:
                line = self._line()
                if line is None:
                    return None
                size = _chunk_size(line)
                if size == 0:
                    self.state = _TRAILER
                else:
                    if len(self.body) + size > self.max_body:
                        raise BodyTooLarge(f"body exceeds {self.max_body} bytes")
                    self.need, self.state = size, _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not buf:
                    return None
                take = min(self.need, len(buf))
                with memoryview(buf) as view:
                    self.body += view[:take]
                del buf[:take]
                self.need -= take
                if self.need == 0:
                    self.state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                line = self._line()
                if line is None:
                    return None
                if not line:  # the empty line ending the trailer section
                    return self._done(bytes(self.body))
            else:  # _UNTIL_EOF
                self.body += buf
                buf.clear()
                if len(self.body) > self.max_body:
                    raise BodyTooLarge(f"body exceeds {self.max_body} bytes")
                return None

    def feed_eof(self) -> Response:
        """The connection ended: the response if that completes it, else ConnectionClosed."""
        if self.state == _UNTIL_EOF:
            self.keep_alive = False
            return self._done(bytes(self.body))
        raise ConnectionClosed("connection closed before the response was complete")

    def _line(self) -> bytes | None:
        return self._take(b"\r\n", _MAX_LINE, "chunked framing line")

    def _take(self, end_mark: bytes, limit: int, what: str) -> bytes | None:
        """The buffered bytes before `end_mark` (consumed with it), or None until it arrives."""
        buf = self.buf
        end = buf.find(end_mark)
        if end < 0:
            if len(buf) > limit:
                raise ProtocolError(f"{what} exceeds {limit} bytes")
            return None
        taken = bytes(buf[:end])
        del buf[:end + len(end_mark)]
        return taken

    def _head(self, head: bytes) -> bool:
        """Parse status line and headers and choose the body framing; True if the
        response has no body at all."""
        if len(head) > MAX_HEAD:
            raise ProtocolError(f"response head exceeds {MAX_HEAD} bytes")
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not (code.isascii() and code.isdigit()):
            raise ProtocolError(f"bad status line {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or name[0] in " \t":
                raise ProtocolError(f"bad header line {line[:100]!r}")
            name = name.lower()
            value = value.strip(" \t")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status = int(code)
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): the real one follows
            if status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            return False
        self.status, self.reason, self.headers = status, reason, headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = ("close" not in connection if version == "HTTP/1.1"
                           else "keep-alive" in connection)
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise ProtocolError(f"server sent Content-Encoding {encoding!r} though identity was asked for")
        if status == 204 or status == 304:
            return True
        transfer = headers.get("transfer-encoding")
        if transfer is not None:
            if transfer.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self.state = _CHUNK_SIZE
            else:  # a response body in another transfer coding runs to the connection's end
                self.state, self.keep_alive = _UNTIL_EOF, False
            if "content-length" in headers:  # both framings: do not trust the connection after
                self.keep_alive = False
            return False
        length = headers.get("content-length")
        if length is None:
            self.state, self.keep_alive = _UNTIL_EOF, False
            return False
        if not length.isdigit() or not length.isascii():
            raise ProtocolError(f"bad Content-Length {length[:40]!r}")
        if len(length) > _MAX_LENGTH_DIGITS:
            raise BodyTooLarge(f"body of a {len(length)}-digit length exceeds {self.max_body} bytes")
        size = int(length)
        if size > self.max_body:
            raise BodyTooLarge(f"body of {size} bytes exceeds {self.max_body}")
        if size == 0:
            return True
        self.state, self.need = _LENGTH, size
        return False

    def _done(self, body: bytes) -> Response:
        return Response(self.status, self.reason, self.headers, body, self.keep_alive)


def _chunk_size(line: bytes) -> int:
    size = line.split(b";", 1)[0].strip(b" \t")  # chunk extensions are ignored
    if not _HEX.fullmatch(size):
        raise ProtocolError(f"bad chunk size line {line[:40]!r}")
    return int(size, 16)


class _NoAnswer(Exception):
    """A connection ended before any byte of the response (retryable on a reused one)."""


class _Connection(asyncio.Protocol):
    """One TCP connection; carries one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, parser: ResponseParser, waiter: asyncio.Future[Response]) -> None:
        self.parser, self.waiter = parser, waiter
        self.transport.write(request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        parser, waiter = self.parser, self.waiter
        if parser is None or waiter is None or waiter.done():
            self.abort()  # bytes nobody asked for (e.g. a 408 before an idle close): drop the connection
            return
        try:
            response = parser.feed(data)
        except Exception as e:  # noqa: BLE001 - an exception must never escape an asyncio callback
            self.parser = None
            waiter.set_exception(e if isinstance(e, HttpError) else
                                 ProtocolError(f"unparsable response ({type(e).__name__}: {str(e)[:100]})"))
            return
        if response is not None:
            self.parser = self.waiter = None
            if parser.buf:  # bytes past the response: the framing cannot be trusted
                response.keep_alive = False
            waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        parser, waiter = self.parser, self.waiter
        self.parser = self.waiter = None
        if parser is not None and waiter is not None and not waiter.done():
            if not parser.started:
                waiter.set_exception(_NoAnswer(str(exc) if exc else ""))
            else:
                try:
                    waiter.set_result(parser.feed_eof())
                except HttpError as e:
                    waiter.set_exception(e)
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self) -> None:
        if self.transport is not None:
            # connection_lost follows on the loop: it closes the socket and settles a request
            # still waiting (close() from another task), so nothing hangs.
            self.transport.abort()


class HttpGetClient:
    """Keep-alive GETs to one host:port; one request at a time (the scraper never overlaps
    its own scrapes). `close()` drops the connection; a later get() opens a new one."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 1.0,
        max_body: int = MAX_BODY,
        headers: dict[str, str] | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self.port = port
        self.timeout = timeout
        self.max_body = max_body
        self.ssl = ssl  # None = plain http; else https with this context (verification is its business)
        self.authority = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        extra = {"Host": self.authority, "Accept-Encoding": "identity", "Connection": "keep-alive",
                 **(headers or {})}
        for name, value in extra.items():
            if not name or not _NO_CRLF.fullmatch(name + value) or ":" in name:
                raise ValueError(f"bad request header {name!r}")
        self._head_tail = "".join(f"{k}: {v}\r\n" for k, v in extra.items()) + "\r\n"
        self._requests: dict[str, bytes] = {}
        self._conn: _Connection | None = None
        self._busy = False
        # The request in flight, for the watchdog: (waiter, deadline, path, timeout).
        self._inflight: tuple[asyncio.Future[Response], float, str, float] | None = None
        # One lazily re-armed timer instead of one timer per request: a scrape takes about
        # a millisecond and its timeout is about a second, so the timer rarely fires.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None  # connection and timer belong to it
        self._generation = 0  # bumped by close(): a request cut by it is not retried
        self.connects = 0  # connections opened so far (reuse shows as few)

    def url(self, path: str) -> str:
        return f"{'https' if self.ssl is not None else 'http'}://{self.authority}{path}"

    async def get(self, path: str = "/", *, timeout: float | None = None, max_body: int | None = None) -> Response:
        """One GET. Raises TimeoutError (whole request past `timeout`, connect included),
        BodyTooLarge, ProtocolError, ConnectionClosed or OSError (connect failed). Any
        status is returned as a Response; see Response.raise_for_status."""
        if self._busy:
            raise RuntimeError("HttpGetClient.get: one request at a time per client")
        request = self._requests.get(path)
        if request is None:
            request = self._request(path)
        budget = self.timeout if timeout is None else timeout
        if budget <= 0:
            raise ValueError(f"timeout must be positive, got {budget}")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or reused under another loop: start clean
            self._forget_loop()
            self._loop = loop
        deadline = loop.time() + budget
        limit = self.max_body if max_body is None else max_body
        generation = self._generation
        self._busy = True
        try:
            while True:
                conn = self._conn
                fresh = conn is None or conn.lost or conn.transport.is_closing()  # type: ignore[union-attr]
                if fresh:
                    conn = await self._connect(loop, deadline, path, budget, generation)
                waiter = loop.create_future()
                self._inflight = (waiter, deadline, path, budget)
                if deadline < self._watch_at or self._watchdog is None:
                    self._arm(loop, deadline)
                conn.send(request, ResponseParser(limit), waiter)
                try:
                    response = await waiter
                except _NoAnswer as e:
                    self._drop()
                    if fresh or generation != self._generation:
                        raise ConnectionClosed(f"{self.authority} closed the connection without a response"
                                               + (f" ({e})" if str(e) else "")) from None
                    continue  # the server closed the idle connection as we reused it: once more, fresh
                except BaseException:  # timeout, bad answer, cancellation: the connection's state is unknown
                    self._drop()
                    raise
                if not response.keep_alive or conn.lost:
                    self._drop()
                return response
        finally:
            self._inflight = None
            self._busy = False

    async def close(self) -> None:
        """Close the connection, if any, and wait until its socket is closed."""
        self._generation += 1
        conn = self._conn
        self._forget_loop()
        if conn is not None:
            await conn.closed

    # ------------------------------------------------------------------ internals
    def _request(self, path: str) -> bytes:
        if not path.startswith("/") or not (path.isascii() and path.isprintable()) or " " in path:
            raise ValueError(f"bad request path {path!r}")
        request = f"GET {path} HTTP/1.1\r\n{self._head_tail}".encode("latin-1")
        if len(self._requests) < _MAX_CACHED_REQUESTS:
            self._requests[path] = request
        return request

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float, path: str,
                       budget: float, generation: int) -> _Connection:
        self._drop()
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(lambda: _Connection(loop), self.host, self.port,
                                                       ssl=self.ssl, ssl_handshake_timeout=self.timeout if self.ssl
                                                       else None)
        except TimeoutError:
            raise TimeoutError(f"GET {self.url(path)} timed out connecting ({budget:g}s)") from None
        if generation != self._generation:  # close() ran meanwhile: keep nothing open
            conn.abort()
            raise ConnectionClosed(f"{self.authority}: client closed while connecting")
        self._conn = conn
        self.connects += 1
        return conn

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = loop.call_at(when, self._watch, loop)
        self._watch_at = when

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        inflight = self._inflight
        if inflight is None:
            return  # idle: the next request arms it again
        waiter, deadline, path, budget = inflight
        if deadline > loop.time():  # a later request than the one it was armed for: wait for its deadline
            self._arm(loop, deadline)
        elif not waiter.done():
            waiter.set_exception(TimeoutError(f"GET {self.url(path)} timed out ({budget:g}s)"))

    def _forget_loop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
