"""Property-based ext_proc message sequences against both transports over real sockets
(issue 8): whatever order, repetition, truncation or cancellation a client chooses, nothing
stays in flight, no traceback is logged and the server goes on answering.

Each transport is served once per module on its own event loop; every generated example
runs on that loop, then the invariants are checked."""

from __future__ import annotations

import asyncio
import logging
import struct

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import HttpTrailers, ProcessingRequest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epp.handlers.protocol import METHOD_PATH
from tests.extproc import (
    BUFFERED,
    FDS,
    Harness,
    body_msg,
    completion,
    destination,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)

BODY_LIMIT = 4096
EXAMPLES = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

MESSAGES = {
    "headers_fds": lambda: headers_msg(FDS),
    "headers_buffered": lambda: headers_msg(BUFFERED),
    "headers_eos": lambda: headers_msg(FDS, method="GET", path="/v1/models", eos=True),
    "body": lambda: body_msg(completion()[:20], False),
    "body_eos": lambda: body_msg(completion(), True),
    "bad_json_eos": lambda: body_msg(b'{"model": ', True),
    "huge_body": lambda: body_msg(b"x" * (BODY_LIMIT + 1), False),
    "request_trailers": lambda: ProcessingRequest(request_trailers=HttpTrailers()),
    "response_headers": lambda: response_headers_msg(),
    "response_headers_eos": lambda: response_headers_msg(status=503, eos=True),
    "response_body": lambda: response_body_msg(b'{"model":"m1",', False),
    "response_body_eos": lambda: response_body_msg(b'"usage":{}}', True),
    "response_trailers": lambda: ProcessingRequest(response_trailers=HttpTrailers()),
}
# Envoy's own orders weighted in, so many examples get past routing into the response phase
ENVOY_FDS = ["headers_fds", "body", "body_eos", "response_headers", "response_body", "response_body_eos"]
sequences = st.one_of(
    st.lists(st.sampled_from(sorted(MESSAGES)), max_size=8),
    st.integers(0, len(ENVOY_FDS)).flatmap(
        lambda n: st.lists(st.sampled_from(sorted(MESSAGES)), max_size=3).map(lambda extra: ENVOY_FDS[:n] + extra)),
)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", params=["grpcio", "native"])
def served(request):
    """(loop, harness, log records) for one transport, shared by the module's examples."""
    loop = asyncio.new_event_loop()
    harness_class = type("Served", (Harness,), {"transport": request.param})
    h = harness_class(max_request_body_bytes=BODY_LIMIT)
    loop.run_until_complete(h.__aenter__())
    records = Records()
    logger = logging.getLogger("epp")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield loop, h, records
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
        loop.run_until_complete(h.__aexit__(None, None, None))
        loop.close()


async def check_invariants(h: Harness, records: Records) -> None:
    await h.assert_released()
    tracebacks = [r for r in records.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    records.records.clear()
    call = h.stream()  # the server still answers
    await call.write(headers_msg(method="GET", path="/v1/models", eos=True))
    destination(await asyncio.wait_for(call.read(), 10))
    call.cancel()
    await h.assert_released()


async def drain(call) -> None:
    try:
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass


async def grpc_sequence(h: Harness, kinds: list[str], ending: str) -> None:
    call = h.stream()
    for kind in kinds:
        try:
            await call.write(MESSAGES[kind]())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            break  # the server already ended the stream
    if ending == "cancel":
        call.cancel()
    else:
        try:
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        await drain(call)


@given(kinds=sequences, ending=st.sampled_from(["half-close", "cancel"]))
@EXAMPLES
def test_any_message_sequence_leaves_nothing_in_flight(served, kinds, ending):
    loop, h, records = served
    loop.run_until_complete(grpc_sequence(h, kinds, ending))
    loop.run_until_complete(check_invariants(h, records))


# ------------------------------------------------------------------ truncation, over the h2 library
REQUEST_HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", METHOD_PATH), (":authority", "epp"),
                   ("content-type", "application/grpc"), ("te", "trailers")]


def framed(kinds: list[str]) -> bytes:
    out = bytearray()
    for kind in kinds:
        data = MESSAGES[kind]().SerializeToString()
        out += b"\x00" + struct.pack(">I", len(data)) + data
    return bytes(out)


async def h2_truncated(port: int, kinds: list[str], cut: float, ending: str) -> None:
    data = framed(kinds)
    data = data[:int(len(data) * cut)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, REQUEST_HEADERS)
    try:
        for i in range(0, len(data), 1000):
            conn.send_data(1, data[i:i + 1000])
        if ending == "end-stream":
            conn.end_stream(1)
        elif ending == "rst-stream":
            conn.reset_stream(1, 8)
    except h2.exceptions.H2Error:
        pass
    writer.write(conn.data_to_send())
    await writer.drain()
    if ending == "end-stream":  # read until the server ends the stream
        done = False
        while not done:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            writer.write(conn.data_to_send())
    writer.close()


@given(kinds=sequences.filter(bool), cut=st.floats(0, 1), ending=st.sampled_from(["end-stream", "rst-stream", "close"]))
@EXAMPLES
def test_truncated_messages_and_abrupt_ends_leave_nothing_in_flight(served, kinds, cut, ending):
    loop, h, records = served
    loop.run_until_complete(h2_truncated(h.server.port, kinds, cut, ending))
    loop.run_until_complete(check_invariants(h, records))
