"""Hostile ext_proc streams against both transports (issue 8 findings 4 and 8): messages out
of the protocol's order end that stream with INVALID_ARGUMENT, release what the request
held, log one line without a traceback, and the server keeps serving; request bodies over
--max-request-body-bytes are answered 413 through an ImmediateResponse."""

from __future__ import annotations

import logging

import grpc
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpTrailers, ProcessingRequest

from epp.errors import HTTP_STATUS
from tests.extproc import (
    BUFFERED,
    FDS,
    Harness,
    body_msg,
    completion,
    destination,
    headers_msg,
    read,
    response_body_msg,
    response_headers_msg,
    send_request,
    transport,  # noqa: F401 - the autouse fixture: every test runs against both transports
)


async def expect_invalid_argument(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        for _ in range(20):  # replies sent before the error may come first
            await read(call, 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.details()


def protocol_errors(caplog) -> list[logging.LogRecord]:
    """The picker's log lines about protocol errors; none of its lines carries a traceback.
    (grpc.aio's own poller may log on the asyncio logger when an earlier test's loop closed.)"""
    ours = [r for r in caplog.records if r.name.startswith("epp")]
    assert not [r for r in ours if r.exc_info or "Traceback" in r.getMessage()], "a traceback was logged"
    return [r for r in ours if "protocol error" in r.getMessage()]


async def serves_a_request(h: Harness) -> None:
    call = h.stream()
    await call.write(headers_msg(method="GET", path="/v1/models", eos=True))
    destination((await read(call, 1))[0])
    call.cancel()


@pytest.mark.parametrize("mode", [FDS, BUFFERED])
async def test_repeated_request_headers_end_the_stream_and_release_everything(mode, caplog):
    """Finding 4: five streams that send request_headers again after routing left ten
    requests in flight; now each stream ends with one logged line and nothing leaks."""
    caplog.set_level(logging.INFO, logger="epp")
    async with Harness() as h:
        for _ in range(5):
            call = h.stream()
            await send_request(call, mode)
            assert sum(h.in_flight()) == 1 and h.admission.in_flight == 1
            await call.write(headers_msg(mode))
            assert "request_headers received twice" in await expect_invalid_argument(call)
        await h.assert_released()
        assert len(protocol_errors(caplog)) == 5
        await serves_a_request(h)
        await h.assert_released()


BEFORE_HEADERS = {
    "request_body": [body_msg(completion(), True)],
    "request_trailers": [ProcessingRequest(request_trailers=HttpTrailers())],
    "response_headers": [response_headers_msg()],
    "response_body": [response_body_msg(b"{}", True)],
}


@pytest.mark.parametrize("first", sorted(BEFORE_HEADERS))
async def test_messages_before_request_headers_are_refused(first, caplog):
    caplog.set_level(logging.INFO, logger="epp")
    async with Harness() as h:
        call = h.stream()
        for msg in BEFORE_HEADERS[first]:
            await call.write(msg)
        assert f"{first} before request_headers" in await expect_invalid_argument(call)
        await h.assert_released()
        assert len(protocol_errors(caplog)) == 1
        await serves_a_request(h)


@pytest.mark.parametrize(("late", "problem"), [
    (body_msg(b"more", True), "request_body after the end of the request body"),
    (response_body_msg(b"{}", True), "response_body before response_headers"),
])
async def test_out_of_order_after_routing_releases_the_routed_request(late, problem, caplog):
    caplog.set_level(logging.INFO, logger="epp")
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg())
        await call.write(body_msg(completion(), True))
        await read(call, 2)
        assert sum(h.in_flight()) == 1
        await call.write(late)
        assert problem in await expect_invalid_argument(call)
        await h.assert_released()
        assert len(protocol_errors(caplog)) == 1


async def test_repeated_response_headers_are_refused(caplog):
    async with Harness() as h:
        call = h.stream()
        await call.write(headers_msg())
        await call.write(body_msg(completion(), True))
        await read(call, 2)
        await call.write(response_headers_msg())
        await read(call, 1)
        await call.write(response_headers_msg())
        assert "response_headers received twice" in await expect_invalid_argument(call)
        await h.assert_released()


# ------------------------------------------------------------------ finding 8: the body limit
@pytest.mark.parametrize("mode", [FDS, BUFFERED])
async def test_request_body_over_the_limit_gets_413(mode):
    assert HTTP_STATUS["PayloadTooLarge"] == 413
    async with Harness(max_request_body_bytes=1000) as h:
        call = h.stream()
        await call.write(headers_msg(mode))
        if mode == BUFFERED:
            await read(call, 1)
            await call.write(body_msg(b"x" * 1001, True))
        else:
            await call.write(body_msg(b"x" * 600, False))
            await call.write(body_msg(b"x" * 401, False))  # 1,001 bytes in all: one over
        (reply,) = await read(call, 1)
        ir = reply.immediate_response
        assert ir.status.code == 413
        assert ir.body.startswith(b"inference error: PayloadTooLarge - ") and b"1000 bytes" in ir.body
        await h.assert_released()
        assert h.telemetry.registry.get_sample_value(
            "inference_objective_request_error_total",
            {"model_name": "", "target_model_name": "", "error_code": "PayloadTooLarge"}) == 1
    async with Harness(max_request_body_bytes=1000) as h:  # exactly at the limit: routed
        call = h.stream()
        body = completion(prompt="y" * (1000 - len(completion(prompt=""))))
        assert len(body) == 1000
        await call.write(headers_msg(mode))
        if mode == BUFFERED:
            await read(call, 1)
        await call.write(body_msg(body, True))
        destination((await read(call, 1))[0])
        call.cancel()
        await h.assert_released()


def test_max_request_body_bytes_flag():
    from epp.options import build_parser, parse_args

    assert parse_args(["--endpoints=10.0.0.1:8000"]).max_request_body_bytes == 64 * 1024 * 1024
    assert parse_args(["--endpoints=10.0.0.1:8000", "--max-request-body-bytes=1024"]).max_request_body_bytes == 1024
    help_text = build_parser().format_help()
    assert "--max-request-body-bytes" in help_text and "413" in help_text
    with pytest.raises(SystemExit):
        parse_args(["--endpoints=10.0.0.1:8000", "--max-request-body-bytes=0"])
