"""The transport-neutral state machine of one ext_proc stream (one HTTP request through
Envoy; reference protocol.md). Both transports (epp.handlers.grpcio, epp.handlers.h2)
drive it through the same three members: `handle(msg)`, `finished`, `close()`.

Both request body modes are recognised from `protocol_config` on the first message:
- FULL_DUPLEX_STREAMED: Envoy streams body chunks without waiting; the header reply
  (with the destination) is held until the whole body is in, then the body goes back
  as `streamed_response` chunks of at most MAX_CHUNK bytes.
- BUFFERED (also STREAMED / BUFFERED_PARTIAL): headers are answered at once with
  CONTINUE and the destination rides on the body reply.

With in-flight eviction on (flowControl.enableEviction), a routed request is tracked by
the evictor until its stream ends. When the evictor picks it, the stream calls the
transport's `on_evict`; the transport then sends what `evict()` returns (the reference's
ImmediateResponse 429, in whatever phase the stream is) and ends the RPC with OK.

Messages must come in the order Envoy sends them: request headers once, then the
request body/trailers, then response headers once, then the response body/trailers.
Anything else (a repeated request_headers, a body before headers, a response before a
request, anything after the end) raises StreamProtocolError: the transport ends that
stream with INVALID_ARGUMENT and close() releases what the request held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from epp.errors import InferenceError
from epp.flowcontrol.eviction import EvictionItem, RequestEvictor
from epp.handlers.protocol import (
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    EXT_PROC_ATTRIBUTES,
    MAX_CHUNK,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    UPSTREAM_ADDRESS,
)
from epp.handlers.replies import (
    CONTINUE_REQUEST_HEADERS,
    CONTINUE_RESPONSE_HEADERS,
    EMPTY_REQUEST_BODY,
    EMPTY_RESPONSE_BODY,
    REQUEST_BODY,
    REQUEST_HEADERS,
    REQUEST_TRAILERS,
    RESPONSE_BODY,
    RESPONSE_TRAILERS,
    RoutingReplies,
    eviction_reply,
    immediate_reply,
    response_body_reply,
    response_headers_reply,
    streamed_body_reply,
)
from epp.requestcontrol.director import Director, RequestContext

log = logging.getLogger("epp.handlers.stream")

_FDS = ProcessingMode.FULL_DUPLEX_STREAMED
Replies = list[bytes]


class StreamProtocolError(Exception):
    """A message the ext_proc protocol does not allow at this point of the stream."""


def _headers(msg) -> dict[str, str]:
    out = {}
    for h in msg.headers.headers:
        raw = h.raw_value  # one field read per header: each read builds a new Python object
        out[h.key] = raw.decode("utf-8", "replace") if raw else h.value
    return out


def _subset_hint(msg: ProcessingRequest) -> list[str] | None:
    if not msg.HasField("metadata_context"):
        return None
    fm = msg.metadata_context.filter_metadata
    if SUBSET_NAMESPACE not in fm:
        return None
    fields = fm[SUBSET_NAMESPACE].fields
    if SUBSET_KEY not in fields:
        return None
    value = fields[SUBSET_KEY]
    if value.HasField("list_value"):
        return [v.string_value for v in value.list_value.values]
    if value.HasField("string_value"):  # tolerate a single comma-joined string
        return [s for s in value.string_value.split(",") if s]
    return []


def _served_endpoint(msg: ProcessingRequest) -> str:
    for attrs in (msg.attributes, msg.response_headers.attributes):
        if EXT_PROC_ATTRIBUTES in attrs:
            fields = attrs[EXT_PROC_ATTRIBUTES].fields
            if UPSTREAM_ADDRESS in fields:
                return fields[UPSTREAM_ADDRESS].string_value
    return ""


class ExtProcStream:
    """State of one ext_proc stream (one HTTP request)."""

    __slots__ = ("handler", "director", "request_fds", "response_fds", "ctx", "chunks", "body_bytes", "subset",
                 "routed", "request_ended", "request_trailers_seen", "response_started", "response_ended",
                 "finished", "opened_at", "evicted", "on_evict", "tracked", "evictable")

    def __init__(self, handler: ExtProcHandler) -> None:
        self.handler = handler
        self.director = handler.director
        self.request_fds = True
        self.response_fds = True
        self.ctx: RequestContext | None = None
        self.chunks: list[bytes] = []
        self.body_bytes = 0
        self.subset: list[str] | None = None
        self.routed = False
        self.request_ended = False  # the request body is complete (eos, trailers, or bodiless)
        self.request_trailers_seen = False
        self.response_started = False  # response headers arrived
        self.response_ended = False
        self.finished = False  # the stream is done: the transport ends the RPC with OK
        self.opened_at = 0.0  # monotonic, when stream metrics are on (--enable-grpc-stream-metrics)
        self.evicted = ""  # the dropped reason, once the evictor chose this request
        self.on_evict: Callable[[], None] | None = None  # the transport's wake-up: send evict() now
        self.tracked = False  # in the evictor's in-flight set
        self.evictable = False  # and the victim filter accepted it: the transport must answer on_evict

    def handle(self, msg: ProcessingRequest) -> Replies | Coroutine[Any, Any, Replies] | None:
        """Dispatch one message: the replies, a coroutine for the request-phase handlers
        (they may wait for admission), or None for a message kind this picker does not
        handle. Raises StreamProtocolError for a message out of order."""
        kind = msg.WhichOneof("request")
        # messages in order take a short path (these four are nearly every message)
        if kind == "response_body":
            if self.response_started and not self.response_ended and not self.finished:
                return self.response_body(msg)
        elif kind == "request_body":
            if self.ctx is not None and not self.request_ended and not self.finished:
                return self.request_body(msg)
        elif kind == "request_headers":
            if self.ctx is None:
                return self.request_headers(msg)
        elif kind == "response_headers":
            if self.ctx is not None and not self.response_started and not self.finished:
                return self.response_headers(msg)
        elif kind not in _ORDER:
            return None
        problem = self._out_of_order(kind)
        if problem:
            raise StreamProtocolError(f"{kind} {problem}")
        return _ORDER[kind](self, msg)

    def _out_of_order(self, kind: str) -> str:
        """Why `kind` may not come now ("" when it may)."""
        if self.finished:
            return "after the end of the stream"
        if kind == "request_headers":
            return "received twice" if self.ctx is not None else ""
        if self.ctx is None:
            return "before request_headers"
        if kind == "request_body":
            return "after the end of the request body" if self.request_ended else ""
        if kind == "request_trailers":
            return "after the end of the request" if self.request_trailers_seen else ""
        if kind == "response_headers":
            return "received twice" if self.response_started else ""
        if not self.response_started:  # response_body, response_trailers
            return "before response_headers"
        return "after the end of the response" if self.response_ended else ""

    # ------------------------------------------------------------------ request phase
    async def request_headers(self, msg: ProcessingRequest) -> Replies:
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            self.request_fds = pc.request_body_mode == _FDS
            self.response_fds = pc.response_body_mode == _FDS
        h = msg.request_headers
        self.ctx = self.director.new_context(_headers(h))
        if not self.handler.disable_subset_filter:
            self.subset = _subset_hint(msg)
        if h.end_of_stream:  # bodiless: route on headers alone
            self.request_ended = True
            self.request_trailers_seen = True  # no body, so no trailers either
            return await self._route(b"", REQUEST_HEADERS)
        return [] if self.request_fds else [CONTINUE_REQUEST_HEADERS]

    async def request_body(self, msg: ProcessingRequest) -> Replies:
        b = msg.request_body
        if b.body:
            self.body_bytes += len(b.body)
            if self.body_bytes > self.handler.max_request_body_bytes:
                self.chunks = []
                return self._refuse(InferenceError(
                    "PayloadTooLarge", f"request body over {self.handler.max_request_body_bytes} bytes"))
            self.chunks.append(b.body)
        if not b.end_of_stream:
            return [] if self.request_fds else [EMPTY_REQUEST_BODY]
        self.request_ended = True
        return await self._route(self._body(), REQUEST_HEADERS if self.request_fds else REQUEST_BODY)

    async def request_trailers(self, msg: ProcessingRequest) -> Replies:
        self.request_trailers_seen = True
        if self.routed:
            return [REQUEST_TRAILERS]
        # Trailers end the body: route, answer headers and body, then the trailers.
        self.request_ended = True
        replies = await self._route(self._body(), REQUEST_HEADERS if self.request_fds else REQUEST_BODY,
                                    trailers=True)
        if not self.finished:
            replies.append(REQUEST_TRAILERS)
        return replies

    def _body(self) -> bytes:
        chunks = self.chunks
        self.chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _refuse(self, error: InferenceError) -> Replies:
        """End the request with an ImmediateResponse; close() releases what it held."""
        assert self.ctx is not None
        self.finished = True
        self.director.failed(self.ctx, error)
        return [immediate_reply(error)]

    async def _route(self, body: bytes, field: int, trailers: bool = False) -> Replies:
        ctx = self.ctx
        assert ctx is not None
        self.routed = True
        try:
            await self.director.route(ctx, body, self.subset)
        except InferenceError as e:
            return self._refuse(e)
        except Exception:  # noqa: BLE001 - nothing a request does may crash the server
            log.exception("request_id=%s: unexpected failure while routing", ctx.request_id)
            return self._refuse(InferenceError("Internal", "unexpected failure in the endpoint picker"))
        evictor = self.handler.evictor
        if evictor is not None and ctx.request is not None:
            self.evictable = evictor.track(EvictionItem(ctx.key, ctx.request.priority, time.monotonic(),
                                                        ctx.targets[0].hostport, self._evicted))
            self.tracked = True
        out_body = ctx.new_body if ctx.new_body is not None else body
        replies = [self.handler.routing.reply(ctx, field, len(out_body) if ctx.new_body is not None else -1,
                                              out_body if field == REQUEST_BODY and ctx.new_body is not None
                                              else None)]
        if field == REQUEST_HEADERS and (body or trailers or ctx.new_body):
            if not out_body:
                replies.append(streamed_body_reply(REQUEST_BODY, b"", not trailers))
            else:
                view = memoryview(out_body)
                last = len(out_body)
                for start in range(0, last, MAX_CHUNK):
                    end = min(start + MAX_CHUNK, last)
                    chunk = out_body if (start == 0 and end == last) else view[start:end]
                    replies.append(streamed_body_reply(REQUEST_BODY, chunk, end == last and not trailers))
        return replies

    # ------------------------------------------------------------------ eviction
    def _evicted(self, reason: str) -> None:
        """The evictor chose this request (called on its own loop turn)."""
        if self.finished or self.evicted or not self.tracked:
            return
        self.evicted = reason
        if self.on_evict is not None:
            self.on_evict()

    def evict(self) -> Replies:
        """The replies that end an evicted request (none when it completed meanwhile, as the
        reference ignores an eviction after the response); the stream is finished after."""
        if self.finished:
            return []
        self.finished = True
        assert self.ctx is not None
        log.info("request evicted by flow control request_id=%s (%s)", self.ctx.request_id,
                 "its response was streaming" if self.response_started else "before its response")
        return [eviction_reply(self.evicted)]

    # ------------------------------------------------------------------ response phase
    def response_headers(self, msg: ProcessingRequest) -> Replies:
        self.response_started = True
        h = msg.response_headers
        ctx = self.ctx
        assert ctx is not None
        headers = _headers(h)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        set_headers = self.director.response_headers(ctx, status, headers, _served_endpoint(msg))
        remove = ["content-length"] if ctx.restorer is not None and "content-length" in headers else []
        if h.end_of_stream:
            self.response_ended = self.finished = True
            self.director.complete(ctx)
        if not set_headers and not remove:
            return [CONTINUE_RESPONSE_HEADERS]
        return [response_headers_reply(set_headers, remove)]

    def response_body(self, msg: ProcessingRequest) -> Replies:
        b = msg.response_body
        ctx = self.ctx
        assert ctx is not None
        chunk, eos = b.body, b.end_of_stream
        out = self.director.response_body(ctx, chunk, eos)
        if eos:
            self.response_ended = self.finished = True
            self.director.complete(ctx)
        if self.response_fds:
            return [streamed_body_reply(RESPONSE_BODY, chunk if out is None else out, eos)]
        if out is None:
            return [EMPTY_RESPONSE_BODY]
        return [response_body_reply(out)]

    def response_trailers(self, msg: ProcessingRequest) -> Replies:
        self.response_ended = self.finished = True
        ctx = self.ctx
        assert ctx is not None
        replies = []
        if ctx.restorer is not None and self.response_fds:
            held = ctx.restorer.flush()
            if held:
                replies.append(streamed_body_reply(RESPONSE_BODY, held, False))
        self.director.complete(ctx)
        replies.append(RESPONSE_TRAILERS)
        return replies

    def close(self) -> None:
        """The stream ended (normally, by error or by cancellation): release everything.
        The director's complete() releases once, however often it is called."""
        if self.tracked:
            self.tracked = False
            self.handler.evictor.untrack(self.ctx.key)  # type: ignore[union-attr]
        if self.ctx is not None:
            self.director.complete(self.ctx, cancelled=not self.finished)
        if self.opened_at:  # an unfinished stream was cancelled (client, Envoy or shutdown)
            self.director.telemetry.stream_closed("OK" if self.finished else "Canceled",
                                                  time.monotonic() - self.opened_at)
            self.opened_at = 0.0


_ORDER: dict[str, Callable[[ExtProcStream, ProcessingRequest], Any]] = {
    "request_headers": ExtProcStream.request_headers,
    "request_body": ExtProcStream.request_body,
    "request_trailers": ExtProcStream.request_trailers,
    "response_headers": ExtProcStream.response_headers,
    "response_body": ExtProcStream.response_body,
    "response_trailers": ExtProcStream.response_trailers,
}


class ExtProcHandler:
    """Opens the state machine of each ext_proc stream; what both transports are given.
    `serving()` false (a follower under leader election) makes the transports refuse
    streams with UNAVAILABLE."""

    def __init__(self, director: Director, *, disable_subset_filter: bool = False,
                 serving: Callable[[], bool] | None = None,
                 max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
                 evictor: RequestEvictor | None = None) -> None:
        self.director = director
        self.evictor = evictor  # in-flight eviction (flowControl.enableEviction); None: off
        self.disable_subset_filter = disable_subset_filter
        self.serving = serving or (lambda: True)
        self.max_request_body_bytes = max_request_body_bytes
        self.routing = RoutingReplies()

    def new_stream(self) -> ExtProcStream:
        """The state machine of one ext_proc stream; its close() must run exactly once when
        the stream ends in any way (normally, by error or cancellation)."""
        st = ExtProcStream(self)
        if self.director.telemetry.grpc_stream_metrics:
            st.opened_at = time.monotonic()
            self.director.telemetry.stream_opened()
        return st


__all__ = ["ExtProcHandler", "ExtProcStream", "StreamProtocolError", "Replies"]
