"""The ext_proc protocol over a real gRPC channel: Envoy 1.40's exact message sequences
for both body modes (reference protocol.md), replayed by a grpc.aio client against the
picker's servicer with static endpoints."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
)

from epp.datalayer.datastore import EndpointSpec
from epp.handlers.replies import streamed_body_reply
from tests.extproc import (
    BUFFERED,
    DEST,
    FDS,
    FLOW_CONTROL,
    IPS,
    Harness,
    body_msg,
    completion,
    destination,
    headers_msg,
    open_request,
    read,
    response_body_msg,
    response_headers_msg,
    send_request,
    set_headers,
    streamed,
    transport,  # noqa: F401 - the autouse fixture: every test runs against both transports
)
from tests.helpers import rewrite


# ------------------------------------------------------------------ tests
def test_streamed_body_framing_matches_protobuf():
    for body, eos in ((b"", True), (b"x", False), (b"a" * 200, True), (b"b" * 70000, True)):
        for field, name in ((3, "request_body"), (4, "response_body")):
            msg = ProcessingResponse.FromString(streamed_body_reply(field, body, eos))
            assert streamed(msg, name) == (body, eos)


async def test_fds_routes_after_whole_body_and_passes_bytes_through():
    async with Harness() as h:
        call = h.stream()
        body = completion()
        # Envoy's HTTP/1.1 sequence: headers, data (eos false), then a 0-byte eos message.
        await open_request(call, body)
        await call.write(body_msg(b"", True))
        hdr, chunk = await read(call, 2)
        assert hdr.WhichOneof("response") == "request_headers"
        header, meta = destination(hdr)
        assert header == meta and header in {f"{ip}:8000" for ip in IPS}
        assert streamed(chunk) == (body, True)
        assert sum(h.in_flight()) == 1
        # response phase, answered in order; streamed_response for every body reply
        await call.write(response_headers_msg())
        (rh,) = await read(call, 1)
        assert rh.WhichOneof("response") == "response_headers"
        resp = orjson.dumps({"model": "m1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        await call.write(response_body_msg(resp[:10], False))
        await call.write(response_body_msg(resp[10:], False))
        await call.write(response_body_msg(b"", True))
        replies = await read(call, 3)
        assert b"".join(streamed(r, "response_body")[0] for r in replies) == resp
        assert [streamed(r, "response_body")[1] for r in replies] == [False, False, True]
        await call.done_writing()
        await h.assert_released()
        out = h.telemetry.registry.get_sample_value("inference_objective_output_tokens_sum",
                                                    {"model_name": "m1", "target_model_name": "m1"})
        assert out == 3


async def test_fds_large_body_many_chunks_is_cut_at_62000_bytes_unchanged():
    async with Harness() as h:
        call = h.stream()
        prompt = "".join(chr(97 + i % 26) for i in range(210_000))
        body = completion(prompt=prompt)
        await call.write(headers_msg())
        for i in range(0, len(body), 16384):
            await call.write(body_msg(body[i:i + 16384], False))
        await call.write(body_msg(b"", True))
        n = -(-len(body) // 62_000)  # the reference picker's chunk size, pinned as a literal
        replies = await read(call, 1 + n)
        destination(replies[0])
        chunks = [streamed(r) for r in replies[1:]]
        assert [len(c) for c, _ in chunks] == [62_000] * (n - 1) + [len(body) - 62_000 * (n - 1)]
        assert b"".join(c for c, _ in chunks) == body
        assert [e for _, e in chunks] == [False] * (n - 1) + [True]
        call.cancel()
        await h.assert_released()


async def test_fds_request_trailers_end_the_body():
    async with Harness() as h:
        call = h.stream()
        body = completion()
        await open_request(call, body)
        await call.write(ProcessingRequest(request_trailers=HttpTrailers(trailers=HeaderMap())))
        hdr, chunk, trailers = await read(call, 3)
        destination(hdr)
        assert streamed(chunk) == (body, False)
        assert trailers.WhichOneof("response") == "request_trailers"
        call.cancel()
        await h.assert_released()


@pytest.mark.parametrize("mode", [FDS, BUFFERED])
async def test_bodiless_get_routes_on_headers(mode):
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg(mode, path="/v1/models", method="GET", eos=True))
        (hdr,) = await read(call, 1)
        assert hdr.WhichOneof("response") == "request_headers"
        header, meta = destination(hdr)
        assert header == meta
        await call.write(response_headers_msg(eos=False))
        await read(call, 1)
        await call.write(response_body_msg(b'{"data": []}', True))
        (rb,) = await read(call, 1)
        assert rb.WhichOneof("response") == "response_body"
        await h.assert_released()


async def test_buffered_continues_headers_and_routes_in_body_reply():
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg(BUFFERED, extra={DEST: "6.6.6.6:1", "x-prefiller-host-port": "6.6.6.6:2"}))
        (first,) = await read(call, 1)  # Envoy waits for this before sending the body
        assert first.WhichOneof("response") == "request_headers"
        assert not first.request_headers.response.HasField("header_mutation")
        body = completion()
        await call.write(body_msg(body, True))
        (reply,) = await read(call, 1)
        assert reply.WhichOneof("response") == "request_body"
        header, meta = destination(reply)
        assert header == meta and header.startswith("10.0.0.")
        common = reply.request_body.response
        assert list(common.header_mutation.remove_headers) == ["x-prefiller-host-port"]
        assert not common.HasField("body_mutation")  # unchanged body: no mutation
        # STREAMED response bodies: every chunk gets an empty BodyResponse
        await call.write(response_headers_msg(content_type="text/event-stream"))
        await read(call, 1)
        events = (b'data: {"model":"m1","choices":[{"text":"a"}]}\n\ndata: {"model":"m1","choi',
                  b'ces":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
        await call.write(response_body_msg(events[0], False))
        await call.write(response_body_msg(events[1], True))
        for r in await read(call, 2):
            assert r.WhichOneof("response") == "response_body"
            assert not r.response_body.response.HasField("body_mutation")
        await h.assert_released()
        out = h.telemetry.registry.get_sample_value("inference_objective_output_tokens_sum",
                                                    {"model_name": "m1", "target_model_name": "m1"})
        assert out == 2


@pytest.mark.parametrize("mode", [FDS, BUFFERED])
async def test_model_rewrite_changes_body_and_restores_name_in_response(mode):
    async with Harness() as h:
        h.datastore.replace_rewrites([rewrite(["m1"], "m1-v2")])
        call = h.stream()
        replies = await send_request(call, mode, completion(model="m1"))
        common = getattr(replies[0], replies[0].WhichOneof("response")).response
        new = orjson.loads(streamed(replies[1])[0] if mode == FDS else common.body_mutation.body)
        assert new["model"] == "m1-v2" and new["prompt"] == "hello world"
        assert set_headers(common)["content-length"] == str(len(orjson.dumps(new)))
        await call.write(response_headers_msg(content_type="text/event-stream", extra={"content-length": "99"}))
        (rh,) = await read(call, 1)
        assert "content-length" in rh.response_headers.response.header_mutation.remove_headers
        sse = b'data: {"model":"m1-v2","choices":[]}\n\ndata: {"model": "m1-v2","x":1}\n\ndata: [DONE]\n\n'
        await call.write(response_body_msg(sse[:20], False))
        await call.write(response_body_msg(sse[20:], True))
        got = []
        for r in await read(call, 2):
            if mode == FDS:
                got.append(streamed(r, "response_body")[0])
            else:
                got.append(r.response_body.response.body_mutation.body)
        assert b"".join(got) == sse.replace(b'"m1-v2"', b'"m1"')
        await h.assert_released()


async def test_client_destination_header_is_overwritten_and_request_id_generated():
    async with Harness() as h:
        call = h.stream()
        msg = headers_msg(extra={DEST: "6.6.6.6:1"})
        del msg.request_headers.headers.headers[-2]  # x-request-id (before the extra header)
        assert "x-request-id" not in {x.key for x in msg.request_headers.headers.headers}
        await call.write(msg)
        await call.write(body_msg(completion(), True))
        hdr, _ = await read(call, 2)
        sets = {o.header.key: o for o in hdr.request_headers.response.header_mutation.set_headers}
        assert sets[DEST].header.raw_value.decode().startswith("10.0.0.")
        assert sets[DEST].append_action == sets[DEST].OVERWRITE_IF_EXISTS_OR_ADD
        assert len(sets["x-request-id"].header.raw_value) == 36
        call.cancel()
        await h.assert_released()


@pytest.mark.parametrize(("subset", "expect"), [
    (None, set(IPS)),
    (["10.0.0.2:8000"], {"10.0.0.2"}),
    (["10.0.0.3:9999"], {"10.0.0.3"}),  # IP match only
    ([], None),
    (["192.168.1.1:8000"], None),
])
async def test_subset_hint(subset, expect):
    async with Harness() as h:
        seen = set()
        for _ in range(6 if expect and len(expect) > 1 else 1):
            call = h.stream()
            await call.write(headers_msg(subset=subset))
            await call.write(body_msg(completion(), True))
            first = (await read(call, 1))[0]
            if expect is None:
                assert first.immediate_response.status.code == 503
                assert first.immediate_response.body.startswith(b"inference error: ServiceUnavailable - ")
                break
            seen.add(destination(first)[0].rsplit(":", 1)[0])
            call.cancel()
        if expect is not None:
            assert seen <= expect and seen
        await h.assert_released()


async def test_subset_filter_disabled_ignores_hint():
    async with Harness(disable_subset=True) as h:
        call = h.stream()
        await call.write(headers_msg(subset=[]))
        await call.write(body_msg(completion(), True))
        destination((await read(call, 1))[0])
        call.cancel()
        await h.assert_released()


@pytest.mark.parametrize(("body", "message"), [
    (b'{"model": "m1", "prompt": ', "not valid JSON"),
    (b'{"prompt": "hi"}', "model not found"),
    (b'{"model": "m1"}', "without prompt"),
])
@pytest.mark.parametrize("mode", [FDS, BUFFERED])
async def test_bad_requests_get_400(body, message, mode):
    async with Harness() as h:
        call = h.stream()
        (reply,) = await send_request(call, mode, body, replies=1)
        ir = reply.immediate_response
        assert ir.status.code == 400
        assert ir.body.startswith(b"inference error: BadRequest - ") and message.encode() in ir.body
        assert {o.header.key: o.header.raw_value for o in ir.headers.set_headers}["content-type"] == b"text/plain"
        await h.assert_released()
        errors = [sample for metric in h.telemetry.registry.collect() for sample in metric.samples
                  if sample.name == "inference_objective_request_error_total"]
        assert [(s.labels["error_code"], s.value) for s in errors] == [("BadRequest", 1.0)]


async def test_chat_without_messages_is_400():
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg(path="/v1/chat/completions"))
        await call.write(body_msg(b'{"model": "m1", "prompt": "x"}', True))
        (reply,) = await read(call, 1)
        assert reply.immediate_response.status.code == 400
        await h.assert_released()


@pytest.mark.parametrize("phase", ["headers", "body", "routed", "response_headers", "response_body"])
@pytest.mark.parametrize("mode", [FDS, BUFFERED])
async def test_cancel_in_every_phase_leaks_nothing(phase, mode):
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg(mode))
        if mode == BUFFERED:
            await read(call, 1)
        if phase != "headers":
            await call.write(body_msg(completion(), phase != "body"))
        if phase not in ("headers", "body"):
            await read(call, 2 if mode == FDS else 1)
            assert sum(h.in_flight()) == 1
        if phase in ("response_headers", "response_body"):
            await call.write(response_headers_msg())
            await read(call, 1)
        if phase == "response_body":
            await call.write(response_body_msg(b'{"model":', False))
            await read(call, 1)
        call.cancel()
        await h.assert_released()


async def test_cancel_while_queued_by_flow_control_leaks_nothing():
    async with Harness(FLOW_CONTROL) as h:
        # no scraped metrics: the pool counts as saturated, so the request waits in the queue
        call = h.stream()
        await call.write(headers_msg())
        await call.write(body_msg(completion(), True))
        for _ in range(500):
            if h.admission.queue_size == 1:
                break
            await asyncio.sleep(0.01)
        assert h.admission.queue_size == 1
        call.cancel()
        await h.assert_released()


async def test_local_reply_without_body_phase_completes():
    """Router 503 (dead upstream) reaches the picker as response headers with end_of_stream."""
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg())
        await call.write(body_msg(completion(), True))
        await read(call, 2)
        await call.write(response_headers_msg(status=503, content_type="text/plain", served="", eos=True))
        (rh,) = await read(call, 1)
        assert rh.WhichOneof("response") == "response_headers"
        await h.assert_released()
        assert h.telemetry.registry.get_sample_value(
            "inference_objective_request_error_total",
            {"model_name": "m1", "target_model_name": "m1", "error_code": "ModelServerError"}) == 1  # the reference's code


async def test_response_trailers_end_the_response_and_flush_held_bytes():
    async with Harness() as h:
        h.datastore.replace_rewrites([rewrite([], "m2")])
        call = h.stream()
        await call.write(headers_msg())
        await call.write(body_msg(completion(model="m1"), True))
        await read(call, 2)
        await call.write(response_headers_msg(content_type="text/event-stream"))
        await read(call, 1)
        await call.write(response_body_msg(b'data: {"model":"m2"}\n\ndata: {"model":"m2"}', False))
        (first,) = await read(call, 1)
        assert streamed(first, "response_body") == (b'data: {"model":"m1"}\n\n', False)
        await call.write(ProcessingRequest(response_trailers=HttpTrailers(trailers=HeaderMap())))
        held, trailers = await read(call, 2)
        assert streamed(held, "response_body") == (b'data: {"model":"m1"}', False)
        assert trailers.WhichOneof("response") == "response_trailers"
        await h.assert_released()


async def test_several_endpoints_are_comma_joined_primary_first_ipv6_bracketed():
    config = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- {name: picker, type: max-score-picker, parameters: {maxNumOfEndpoints: 4}}
"""
    async with Harness(config) as h:
        h.datastore.upsert(EndpointSpec(name="ep6", address="fd00::1", port=8000))
        call = h.stream()
        await call.write(headers_msg())
        await call.write(body_msg(completion(), True))
        header, meta = destination((await read(call, 2))[0])
        assert header == meta
        parts = header.split(",")
        assert sorted(parts) == sorted([f"{ip}:8000" for ip in IPS] + ["[fd00::1]:8000"])
        primary = next(e for e in h.datastore.endpoints() if e.hostport == parts[0])
        assert primary.in_flight == 1 and sum(e.in_flight for e in h.datastore.endpoints()) == 1
        call.cancel()
        await h.assert_released()


async def test_follower_aborts_streams_with_unavailable():
    async with Harness() as h:
        leader = False
        h.ext_proc.serving = lambda: leader
        call = h.stream()
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the abort may come before the write completes
            await call.write(headers_msg(eos=True))
            await read(call, 1)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        leader = True
        call = h.stream()
        await call.write(headers_msg(eos=True))
        destination((await read(call, 1))[0])
        call.cancel()
        await h.assert_released()
