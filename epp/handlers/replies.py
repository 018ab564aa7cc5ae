"""ProcessingResponse framing: the replies the stream state machine sends, serialised here
(the gRPC method has no response serializer) so constant replies are built once, routing
replies are cached per destination, and body chunks are framed by hand around the
original bytes instead of being copied through a message."""

from __future__ import annotations

from typing import TYPE_CHECKING

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct

from epp.errors import DROPPED_REASON_HEADER, InferenceError
from epp.flowcontrol.eviction import EVICTION_BODY
from epp.framework.headers import REQUEST_ID
from epp.handlers.protocol import DESTINATION_HEADER, LB_NAMESPACE, SCORES_KEY, SYSTEM_HEADERS

if TYPE_CHECKING:
    from epp.requestcontrol.director import RequestContext

# ProcessingResponse field numbers (external_processor.proto).
REQUEST_HEADERS, RESPONSE_HEADERS, REQUEST_BODY, RESPONSE_BODY = 1, 2, 3, 4
ROUTE_CACHE_SIZE = 4096  # cached routing replies (per field and destination); cleared when full
# the headers the routing reply removes when a client sent them (the destination is overwritten, not removed)
_REMOVABLE = frozenset(SYSTEM_HEADERS) - {DESTINATION_HEADER}

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_SMALL_VARINTS = tuple(bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(0x4000))
_FIELD_TAGS = {REQUEST_BODY: b"\x1a", RESPONSE_BODY: b"\x22"}  # request_body / response_body, length-delimited


def _varint(n: int) -> bytes:
    if n < 0x4000:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


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


def header_option(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE)


def immediate_reply(error: InferenceError) -> bytes:
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=error.http_status),
        headers=HeaderMutation(set_headers=[header_option("content-type", "text/plain"),
                                            *(header_option(k, v) for k, v in error.headers.items())]),
        body=error.body,
        details=f"inference error: {error.code}",
    )).SerializeToString()


def eviction_reply(reason: str) -> bytes:
    """What the reference sends for a request evicted in flight (handlers/server.go): 429,
    its fixed body and the dropped-reason header (no content-type, no details)."""
    mutation = HeaderMutation(set_headers=[header_option(DROPPED_REASON_HEADER, reason)]) if reason else None
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=429), headers=mutation, body=EVICTION_BODY)).SerializeToString()


def response_headers_reply(set_headers: dict[str, str], remove: list[str]) -> bytes:
    mutation = HeaderMutation(set_headers=[header_option(k, v) for k, v in set_headers.items()],
                              remove_headers=remove)
    return ProcessingResponse(response_headers=HeadersResponse(response=CommonResponse(
        header_mutation=mutation))).SerializeToString()


def response_body_reply(body: bytes) -> bytes:
    """A buffered/streamed (not full-duplex) response body replaced by `body`."""
    mutation = BodyMutation(body=body) if body else BodyMutation(clear_body=True)
    return ProcessingResponse(response_body=BodyResponse(response=CommonResponse(
        body_mutation=mutation))).SerializeToString()


CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=HeadersResponse()).SerializeToString()
CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse()).SerializeToString()
EMPTY_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse()).SerializeToString()
EMPTY_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse()).SerializeToString()
REQUEST_TRAILERS = ProcessingResponse(request_trailers=TrailersResponse()).SerializeToString()
RESPONSE_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse()).SerializeToString()


def _lb_metadata(destination: str, scores: dict[str, float] | None = None) -> Struct:
    s = Struct()
    lb = s.fields[LB_NAMESPACE].struct_value.fields
    lb[DESTINATION_HEADER].string_value = destination
    if scores:  # --emit-endpoint-scores: {"ip:port": weighted total} of every endpoint the primary profile scored
        fields = lb[SCORES_KEY].struct_value.fields
        for hostport, score in scores.items():
            fields[hostport].number_value = score
    return s


class RoutingReplies:
    """The reply carrying the destination: header mutation + clear_route_cache on the
    headers reply (full-duplex, bodiless) or the body reply (buffered), plus envoy.lb
    metadata. Replies without per-request parts are cached per destination."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], bytes] = {}

    def reply(self, ctx: RequestContext, field: int, content_length: int, new_body: bytes | None) -> bytes:
        # nearly every request carries none of them: one C-level scan of its headers decides
        removes = [] if _REMOVABLE.isdisjoint(ctx.headers) else [
            k for k in SYSTEM_HEADERS if k in ctx.headers and k != DESTINATION_HEADER and k not in ctx.upstream_headers]
        simple = (not ctx.upstream_headers and not ctx.generated_request_id and content_length < 0 and not removes
                  and ctx.scores is None)
        if simple:
            cached = self._cache.get((field, ctx.destination))
            if cached is not None:
                return cached
        set_headers = [header_option(DESTINATION_HEADER, ctx.destination)]
        set_headers += [header_option(k, v) for k, v in ctx.upstream_headers.items()]
        if ctx.generated_request_id:
            set_headers.append(header_option(REQUEST_ID, ctx.request_id))
        if content_length >= 0:
            set_headers.append(header_option("content-length", str(content_length)))
        common = CommonResponse(header_mutation=HeaderMutation(set_headers=set_headers, remove_headers=removes),
                                clear_route_cache=True)
        if new_body is not None:
            common.body_mutation.body = new_body
        if field == REQUEST_HEADERS:
            reply = ProcessingResponse(request_headers=HeadersResponse(response=common),
                                       dynamic_metadata=_lb_metadata(ctx.destination, ctx.scores))
        else:
            reply = ProcessingResponse(request_body=BodyResponse(response=common),
                                       dynamic_metadata=_lb_metadata(ctx.destination, ctx.scores))
        data = reply.SerializeToString()
        if simple:
            if len(self._cache) >= ROUTE_CACHE_SIZE:
                self._cache.clear()
            self._cache[(field, ctx.destination)] = data
        return data


__all__ = ["streamed_body_reply", "immediate_reply", "eviction_reply", "header_option", "response_headers_reply",
           "response_body_reply", "RoutingReplies", "REQUEST_HEADERS", "RESPONSE_HEADERS", "REQUEST_BODY",
           "RESPONSE_BODY", "ROUTE_CACHE_SIZE"]
