"""In-flight eviction on the ext_proc stream, over a real gRPC channel and both transports
(the autouse `transport` fixture of tests/extproc.py): once routed, a sheddable
request the evictor picks gets the reference's ImmediateResponse (429, "request evicted
by flow control", x-llm-d-request-dropped-reason: evicted) pushed unprompted on its
stream, in whatever phase it is, and the RPC then ends with OK; everything it held is
released and the revocation is confirmed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from epp.datalayer.datastore import Objective
from epp.errors import DROPPED_REASON_HEADER
from epp.flowcontrol.eviction import EVICTION_BODY, ReclamationController, RequestEvictor, build_eviction
from tests.extproc import (
    BUFFERED,
    FDS,
    Harness,
    read,
    response_body_msg,
    response_headers_msg,
    send_request,
    transport,  # noqa: F401 - the autouse fixture: every test runs against both transports
)
from tests.helpers import until

OBJECTIVE = "x-gateway-inference-objective"


class EvictionHarness(Harness):
    def __init__(self) -> None:
        evictor, self.reclamation = build_eviction(None, 0.05, 2.0, None)
        self.evictor: RequestEvictor = evictor
        super().__init__(evictor=evictor)
        self.admission.detector = None  # never saturated: sheddable requests are admitted (no metrics here)
        self.datastore.set_objective(Objective("batch", -1))
        self.datastore.set_objective(Objective("critical", 10))


async def routed(h: EvictionHarness, objective: str = "batch", mode=FDS):
    """A request routed (replies read) and tracked by the evictor."""
    call = h.stream()
    await send_request(call, mode, extra={OBJECTIVE: objective})
    await until(lambda: h.evictor.stats()[0], 1.0)
    return call


def assert_eviction_reply(reply: ProcessingResponse) -> None:
    assert reply.WhichOneof("response") == "immediate_response"
    ir = reply.immediate_response
    assert ir.status.code == 429
    assert ir.body == EVICTION_BODY == b"request evicted by flow control"
    assert [(o.header.key, o.header.raw_value) for o in ir.headers.set_headers] == [(DROPPED_REASON_HEADER,
                                                                                     b"evicted")]


async def ends_ok(call) -> None:
    assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_evicted_while_waiting_for_the_response_headers():
    async with EvictionHarness() as h:
        call = await routed(h)
        assert h.evictor.stats() == (1, 1)
        confirmed: list[str] = []
        h.evictor.on_terminated = confirmed.append
        evicted = h.evictor.evict_n(1, 10)
        assert len(evicted) == 1
        assert_eviction_reply(await asyncio.wait_for(call.read(), 10))
        await ends_ok(call)
        await h.assert_released()
        assert h.evictor.stats() == (0, 0)
        await until(lambda: confirmed, 1.0)
        assert confirmed == evicted  # the stream's end confirms the revocation, once


@pytest.mark.parametrize("mode, mid_response", [(FDS, True), (BUFFERED, False)],
                         ids=["full-duplex-mid-response-body", "buffered-awaiting-response"])
async def test_evicted_mid_response_body_or_in_buffered_mode(mode, mid_response):
    async with EvictionHarness() as h:
        call = await routed(h, mode=mode)
        if mid_response:
            await call.write(response_headers_msg(content_type="text/event-stream"))
            await call.write(response_body_msg(b"data: {}\n\n", False))
            await read(call, 2)
        assert h.evictor.evict_n(1, 10)
        assert_eviction_reply(await asyncio.wait_for(call.read(), 10))
        await ends_ok(call)
        await h.assert_released()


async def test_a_request_not_below_the_bound_or_not_sheddable_is_not_evicted():
    async with EvictionHarness() as h:
        critical = await routed(h, "critical")
        batch = await routed(h)
        assert h.evictor.stats() == (2, 1)  # tracked both, only the sheddable one is evictable
        assert h.evictor.evict_n(2, -1) == []  # a demand band at -1 may not evict priority -1
        assert h.evictor.stats() == (2, 1)
        assert len(h.evictor.evict_n(2, 10)) == 1  # only the sheddable one
        assert_eviction_reply(await asyncio.wait_for(batch.read(), 10))
        await ends_ok(batch)
        # the critical request goes on to complete normally
        await critical.write(response_headers_msg())
        await critical.write(response_body_msg(b"{}", True))
        replies = await read(critical, 2)
        assert [r.WhichOneof("response") for r in replies] == ["response_headers", "response_body"]
        await ends_ok(critical)
        await h.assert_released()
        assert h.evictor.stats() == (0, 0)


async def test_a_stream_gone_before_the_signal_is_untracked_and_confirmed():
    async with EvictionHarness() as h:
        call = await routed(h)
        confirmed: list[str] = []
        h.evictor.on_terminated = confirmed.append
        evicted = h.evictor.evict_n(1, 10)
        call.cancel()  # Envoy went away at the same moment
        await until(lambda: confirmed, 2.0)
        assert confirmed == evicted
        await h.assert_released()
        assert h.evictor.stats() == (0, 0) and not h.evictor.pending


def test_reclamation_controller_is_what_build_eviction_wires():
    evictor, reclamation = build_eviction(None, 0.05, 2.0, None)
    assert isinstance(reclamation, ReclamationController) and reclamation.evictor is evictor
    assert evictor.on_terminated == reclamation.confirm
