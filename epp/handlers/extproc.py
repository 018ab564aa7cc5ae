"""The ext_proc servicer: one small state machine per Envoy stream (reference protocol.md).

Both request body modes are recognised from `protocol_config` on the first message:
- FULL_DUPLEX_STREAMED: Envoy streams body chunks without waiting; the header reply
  (with the destination) is held until the whole body is in, then the body goes back
  as `streamed_response` chunks of at most 62,000 bytes.
- BUFFERED (also STREAMED / BUFFERED_PARTIAL): headers are answered at once with
  CONTINUE and the destination rides on the body reply.

Replies are serialised here (the gRPC method has no response serializer) so constant
replies are built once, routing replies are cached per destination, and body chunks
are framed by hand around the original bytes instead of being copied through a message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from epp.errors import InferenceError
from epp.requestcontrol.director import Director, RequestContext

log = logging.getLogger("epp.handlers.extproc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
METHOD_PATH = f"/{SERVICE_NAME}/Process"
NOT_LEADER_MESSAGE = "not the leader endpoint picker"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
LB_NAMESPACE = "envoy.lb"
EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"
UPSTREAM_ADDRESS = "upstream.address"
MAX_CHUNK = 62_000
# Headers the picker owns upstream: a client's copies are removed (the destination is overwritten).
SYSTEM_HEADERS = (DESTINATION_HEADER, "x-gateway-destination-endpoint-served", "x-prefiller-host-port")

_FDS = ProcessingMode.FULL_DUPLEX_STREAMED
_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# ProcessingResponse field numbers (external_processor.proto).
_F_REQUEST_HEADERS, _F_RESPONSE_HEADERS, _F_REQUEST_BODY, _F_RESPONSE_BODY = 1, 2, 3, 4


_SMALL_VARINTS = tuple(bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(0x4000))


def _varint(n: int) -> bytes:
    if n < 0x4000:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_FIELD_TAGS = {3: b"\x1a", 4: b"\x22"}  # ProcessingResponse.request_body / response_body, length-delimited


def streamed_body_reply(field: int, body: bytes | memoryview, eos: bool) -> bytes:
    """ProcessingResponse{<field>: BodyResponse{response: {body_mutation: {streamed_response:
    {body, end_of_stream}}}}}, framed by hand around `body` (no copy through a message)."""
    v = _varint
    n = len(body)
    ln = v(n)
    sbr = 1 + len(ln) + n + (2 if eos else 0)
    ls = v(sbr)
    bm = 1 + len(ls) + sbr
    lb = v(bm)
    cr = 1 + len(lb) + bm
    lc = v(cr)
    br = 1 + len(lc) + cr
    return b"".join((_FIELD_TAGS[field], v(br), b"\x0a", lc, b"\x1a", lb, b"\x1a", ls, b"\x0a", ln, body,
                     b"\x10\x01" if eos else b""))


def _header(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def _lb_metadata(destination: str) -> Struct:
    s = Struct()
    s.fields[LB_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = destination
    return s


def immediate_reply(error: InferenceError) -> bytes:
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=error.http_status),
        headers=HeaderMutation(set_headers=[_header("content-type", "text/plain")]),
        body=error.body,
        details=f"inference error: {error.code}",
    )).SerializeToString()


_CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=HeadersResponse()).SerializeToString()
_CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse()).SerializeToString()
_EMPTY_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse()).SerializeToString()
_EMPTY_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse()).SerializeToString()
_REQUEST_TRAILERS = ProcessingResponse(request_trailers=TrailersResponse()).SerializeToString()
_RESPONSE_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse()).SerializeToString()


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


class _Stream:
    """State of one ext_proc stream (one HTTP request)."""

    __slots__ = ("server", "director", "request_fds", "response_fds", "ctx", "chunks", "subset", "routed",
                 "finished")

    def __init__(self, server: ExtProcServer) -> None:
        self.server = server
        self.director = server.director
        self.request_fds = True
        self.response_fds = True
        self.ctx: RequestContext | None = None
        self.chunks: list[bytes] = []
        self.subset: list[str] | None = None
        self.routed = False
        self.finished = False

    def handle(self, msg: ProcessingRequest) -> list[bytes] | Coroutine[Any, Any, list[bytes]] | None:
        """Dispatch one message (every transport drives the stream through this): the replies,
        a coroutine for the request-phase handlers (they may wait for admission), or None for
        a message kind this picker does not handle."""
        kind = msg.WhichOneof("request")
        if kind == "request_body":
            return self.request_body(msg)
        if kind == "response_body":
            return self.response_body(msg)
        if kind == "request_headers":
            return self.request_headers(msg)
        if kind == "response_headers":
            return self.response_headers(msg)
        if kind == "request_trailers":
            return self.request_trailers(msg)
        if kind == "response_trailers":
            return self.response_trailers(msg)
        return None

    # ------------------------------------------------------------------ request phase
    async def request_headers(self, msg: ProcessingRequest) -> list[bytes]:
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            self.request_fds = pc.request_body_mode == _FDS
            self.response_fds = pc.response_body_mode == _FDS
        h = msg.request_headers
        self.ctx = self.director.new_context(_headers(h))
        if not self.server.disable_subset_filter:
            self.subset = _subset_hint(msg)
        if h.end_of_stream:  # bodiless: route on headers alone
            return await self._route(b"", _F_REQUEST_HEADERS)
        return [] if self.request_fds else [_CONTINUE_REQUEST_HEADERS]

    async def request_body(self, msg: ProcessingRequest) -> list[bytes]:
        b = msg.request_body
        if b.body:
            self.chunks.append(b.body)
        if self.routed:  # a body after routing (should not happen): pass it through
            return [streamed_body_reply(_F_REQUEST_BODY, b.body, b.end_of_stream)] if self.request_fds \
                else [_EMPTY_REQUEST_BODY]
        if not b.end_of_stream:
            return [] if self.request_fds else [_EMPTY_REQUEST_BODY]
        return await self._route(self._body(), _F_REQUEST_HEADERS if self.request_fds else _F_REQUEST_BODY)

    async def request_trailers(self, msg: ProcessingRequest) -> list[bytes]:
        if self.routed:
            return [_REQUEST_TRAILERS]
        # Trailers end the body: route, answer headers and body, then the trailers.
        replies = await self._route(self._body(), _F_REQUEST_HEADERS if self.request_fds else _F_REQUEST_BODY,
                                    trailers=True)
        if not self.finished:
            replies.append(_REQUEST_TRAILERS)
        return replies

    def _body(self) -> bytes:
        chunks = self.chunks
        self.chunks = []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _route(self, body: bytes, field: int, trailers: bool = False) -> list[bytes]:
        ctx = self.ctx
        assert ctx is not None
        self.routed = True
        try:
            await self.director.route(ctx, body, self.subset)
        except InferenceError as e:
            self.finished = True
            self.director.failed(ctx, e)
            return [immediate_reply(e)]
        except Exception:  # noqa: BLE001 - nothing a request does may crash the server
            log.exception("request_id=%s: unexpected failure while routing", ctx.request_id)
            e = InferenceError("Internal", "unexpected failure in the endpoint picker")
            self.finished = True
            self.director.failed(ctx, e)
            return [immediate_reply(e)]
        out_body = ctx.new_body if ctx.new_body is not None else body
        replies = [self.server.routing_reply(ctx, field, len(out_body) if ctx.new_body is not None else -1,
                                             out_body if field == _F_REQUEST_BODY and ctx.new_body is not None
                                             else None)]
        if field == _F_REQUEST_HEADERS and (body or trailers or ctx.new_body):
            if not out_body:
                replies.append(streamed_body_reply(_F_REQUEST_BODY, b"", not trailers))
            else:
                view = memoryview(out_body)
                last = len(out_body)
                for start in range(0, last, MAX_CHUNK):
                    end = min(start + MAX_CHUNK, last)
                    chunk = out_body if (start == 0 and end == last) else view[start:end]
                    replies.append(streamed_body_reply(_F_REQUEST_BODY, chunk, end == last and not trailers))
        return replies

    # ------------------------------------------------------------------ response phase
    def response_headers(self, msg: ProcessingRequest) -> list[bytes]:
        h = msg.response_headers
        ctx = self.ctx
        if ctx is None:
            return [_CONTINUE_RESPONSE_HEADERS]
        headers = _headers(h)
        try:
            status = int(headers.get(":status", "0"))
        except ValueError:
            status = 0
        set_headers = self.director.response_headers(ctx, status, headers, _served_endpoint(msg))
        remove = ["content-length"] if ctx.restorer is not None and "content-length" in headers else []
        if h.end_of_stream:
            self.finished = True
            self.director.complete(ctx)
        if not set_headers and not remove:
            return [_CONTINUE_RESPONSE_HEADERS]
        mutation = HeaderMutation(set_headers=[_header(k, v) for k, v in set_headers.items()],
                                  remove_headers=remove)
        return [ProcessingResponse(response_headers=HeadersResponse(response=CommonResponse(
            header_mutation=mutation))).SerializeToString()]

    def response_body(self, msg: ProcessingRequest) -> list[bytes]:
        b = msg.response_body
        ctx = self.ctx
        chunk, eos = b.body, b.end_of_stream
        out = self.director.response_body(ctx, chunk, eos) if ctx is not None else None
        if eos:
            self.finished = True
            if ctx is not None:
                self.director.complete(ctx)
        if self.response_fds:
            return [streamed_body_reply(_F_RESPONSE_BODY, chunk if out is None else out, eos)]
        if out is None:
            return [_EMPTY_RESPONSE_BODY]
        mutation = BodyMutation(body=out) if out else BodyMutation(clear_body=True)
        return [ProcessingResponse(response_body=BodyResponse(response=CommonResponse(
            body_mutation=mutation))).SerializeToString()]

    def response_trailers(self, msg: ProcessingRequest) -> list[bytes]:
        self.finished = True
        ctx = self.ctx
        replies = []
        if ctx is not None:
            if ctx.restorer is not None and self.response_fds:
                held = ctx.restorer.flush()
                if held:
                    replies.append(streamed_body_reply(_F_RESPONSE_BODY, held, False))
            self.director.complete(ctx)
        replies.append(_RESPONSE_TRAILERS)
        return replies

    def close(self) -> None:
        """The stream ended (normally, by error or by cancellation): release everything."""
        if self.ctx is not None:
            self.director.complete(self.ctx)


class ExtProcServer:
    """The ExternalProcessor/Process handler. `serving()` false (a follower under leader
    election) aborts streams with UNAVAILABLE."""

    def __init__(self, director: Director, *, disable_subset_filter: bool = False,
                 serving: Callable[[], bool] | None = None) -> None:
        self.director = director
        self.disable_subset_filter = disable_subset_filter
        self.serving = serving or (lambda: True)
        self._route_cache: dict[tuple[int, str], bytes] = {}

    def routing_reply(self, ctx: RequestContext, field: int, content_length: int, new_body: bytes | None) -> bytes:
        """The reply carrying the destination: header mutation + clear_route_cache on the
        headers reply (FDS, bodiless) or the body reply (BUFFERED), plus envoy.lb metadata."""
        removes = [k for k in SYSTEM_HEADERS if k in ctx.headers and k != DESTINATION_HEADER
                   and k not in ctx.upstream_headers]
        simple = not ctx.upstream_headers and not ctx.generated_request_id and content_length < 0 and not removes
        if simple:
            cached = self._route_cache.get((field, ctx.destination))
            if cached is not None:
                return cached
        set_headers = [_header(DESTINATION_HEADER, ctx.destination)]
        set_headers += [_header(k, v) for k, v in ctx.upstream_headers.items()]
        if ctx.generated_request_id:
            set_headers.append(_header("x-request-id", ctx.request_id))
        if content_length >= 0:
            set_headers.append(_header("content-length", str(content_length)))
        common = CommonResponse(header_mutation=HeaderMutation(set_headers=set_headers, remove_headers=removes),
                                clear_route_cache=True)
        if new_body is not None:
            common.body_mutation.body = new_body
        if field == _F_REQUEST_HEADERS:
            reply = ProcessingResponse(request_headers=HeadersResponse(response=common),
                                       dynamic_metadata=_lb_metadata(ctx.destination))
        else:
            reply = ProcessingResponse(request_body=BodyResponse(response=common),
                                       dynamic_metadata=_lb_metadata(ctx.destination))
        data = reply.SerializeToString()
        if simple:
            if len(self._route_cache) > 4096:
                self._route_cache.clear()
            self._route_cache[(field, ctx.destination)] = data
        return data

    async def process(self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext) -> None:
        # context.read()/write() rather than an async generator: measurably less overhead per message.
        if not self.serving():
            await context.abort(grpc.StatusCode.UNAVAILABLE, NOT_LEADER_MESSAGE)
        st = self.new_stream()
        read, write, eof = context.read, context.write, grpc.aio.EOF
        try:
            while True:
                msg = await read()
                if msg is eof:
                    return
                r = st.handle(msg)
                if r is None:
                    continue
                replies = r if r.__class__ is list else await r
                for reply in replies:
                    await write(reply)
                if st.finished:
                    return
        finally:
            st.close()

    def new_stream(self) -> _Stream:
        """The state machine of one ext_proc stream; its close() must run exactly once when
        the stream ends in any way (normally, by error or cancellation)."""
        return _Stream(self)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Process": grpc.stream_stream_rpc_method_handler(
                self.process, request_deserializer=ProcessingRequest.FromString, response_serializer=None),
        })


def add_ext_proc_server(server: grpc.aio.Server, ext_proc: ExtProcServer) -> None:
    server.add_generic_rpc_handlers((ext_proc.handler(),))


__all__: Sequence[str] = ["ExtProcServer", "add_ext_proc_server", "immediate_reply", "streamed_body_reply",
                          "MAX_CHUNK", "SERVICE_NAME", "METHOD_PATH", "NOT_LEADER_MESSAGE"]
