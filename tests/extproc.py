"""The ext_proc protocol harness the protocol tests share: the picker's servicer with
static endpoints behind either transport (the autouse `transport` fixture runs a test
module importing it against both), reached over a real gRPC channel, and the messages
Envoy 1.40 sends (reference protocol.md), built as Envoy builds them."""

from __future__ import annotations

import asyncio

import grpc
import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from google.protobuf.struct_pb2 import Struct

from epp.assembly import load_plugin_set
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.flowcontrol.admission import AdmissionController, gated_flow_control
from epp.handlers.grpcio import GrpcioTransport
from epp.handlers.h2.server import H2GrpcServer
from epp.handlers.stream import ExtProcHandler
from epp.requestcontrol.director import Director
from epp.server import GRPC_OPTIONS
from epp.telemetry import Telemetry

FDS = ProcessingMode.FULL_DUPLEX_STREAMED
BUFFERED = ProcessingMode.BUFFERED
STREAMED = ProcessingMode.STREAMED
DEST = "x-gateway-destination-endpoint"
IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
FLOW_CONTROL = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: max-score-picker
flowControl: {defaultRequestTTL: 30s}
"""


@pytest.fixture(autouse=True, params=["grpcio", "native"])
def transport(request):
    """Every replay runs against both ext_proc transports (`--ext-proc-transport`)."""
    Harness.transport = request.param
    return request.param


class Harness:
    transport = "grpcio"

    def __init__(self, config: str | None = None, disable_subset: bool = False, **handler_options) -> None:
        self.datastore = Datastore()
        for i, ip in enumerate(IPS):
            self.datastore.upsert(EndpointSpec(name=f"ep{i}", address=ip, port=8000))
        self.telemetry = Telemetry()
        self.pipeline = load_plugin_set(config)
        self.admission = AdmissionController(self.pipeline, policies=self.pipeline.plugins, flow_control=gated_flow_control(
            self.pipeline.feature_gates, self.pipeline.flow_control))
        self.director = Director(self.datastore, self.pipeline, admission=self.admission, telemetry=self.telemetry)
        self.ext_proc = ExtProcHandler(self.director, disable_subset_filter=disable_subset, **handler_options)

    async def __aenter__(self) -> Harness:
        # both transports behind the one interface (epp.handlers.transport.Transport)
        if self.transport == "native":
            self.server = H2GrpcServer(self.ext_proc)
        else:
            self.server = GrpcioTransport(self.ext_proc, options=GRPC_OPTIONS)
        port = await self.server.start("127.0.0.1", 0)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS[1:])
        self.stub = ExternalProcessorStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.admission.close()

    def stream(self):
        return self.stub.Process()

    def in_flight(self) -> list[int]:
        return [e.in_flight for e in self.datastore.endpoints()]

    async def assert_released(self) -> None:
        """No in-flight count, admission slot or queue entry is left behind."""
        for _ in range(200):
            if not any(self.in_flight()) and self.admission.in_flight == 0 and self.admission.queue_size == 0:
                break
            await asyncio.sleep(0.01)
        assert not any(self.in_flight())
        assert not any(e.in_flight_tokens for e in self.datastore.endpoints())
        assert self.admission.in_flight == 0
        assert self.admission.queue_size == 0


# ------------------------------------------------------------------ message builders (as Envoy sends them)
def headers_msg(mode=FDS, *, path="/v1/completions", method="POST", eos=False, extra=None, subset=None,
                response_mode=None):
    hs = {":method": method, ":path": path, ":authority": "gw", ":scheme": "http",
          "content-type": "application/json", "x-request-id": "rid-1", **(extra or {})}
    msg = ProcessingRequest(
        request_headers=HttpHeaders(headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode())
                                                               for k, v in hs.items()]), end_of_stream=eos),
        protocol_config=ProtocolConfiguration(request_body_mode=mode,
                                              response_body_mode=response_mode or (FDS if mode == FDS else STREAMED)),
    )
    if subset is not None:
        s = Struct()
        s.update({"x-gateway-destination-endpoint-subset": subset})
        msg.metadata_context.CopyFrom(Metadata(filter_metadata={"envoy.lb.subset_hint": s}))
    return msg


def body_msg(data: bytes, eos: bool) -> ProcessingRequest:
    return ProcessingRequest(request_body=HttpBody(body=data, end_of_stream=eos))


def response_headers_msg(status=200, content_type="application/json", served="10.0.0.1:8000", eos=False,
                         extra=None):
    hs = {":status": str(status), "content-type": content_type, **(extra or {})}
    msg = ProcessingRequest(response_headers=HttpHeaders(
        headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in hs.items()]),
        end_of_stream=eos))
    if served:
        s = Struct()
        s.update({"upstream.address": served})
        msg.attributes["envoy.filters.http.ext_proc"].CopyFrom(s)
    return msg


def response_body_msg(data: bytes, eos: bool) -> ProcessingRequest:
    return ProcessingRequest(response_body=HttpBody(body=data, end_of_stream=eos))


def completion(prompt="hello world", model="m1", **kw) -> bytes:
    return orjson.dumps({"model": model, "prompt": prompt, "max_tokens": 5, **kw})


def set_headers(common) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def destination(reply: ProcessingResponse) -> tuple[str, str]:
    """(header value, envoy.lb metadata value) of a routing reply."""
    which = reply.WhichOneof("response")
    common = getattr(reply, which).response
    assert common.clear_route_cache
    meta = reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value
    return set_headers(common)[DEST], meta


async def open_request(call, body: bytes) -> None:
    """A full-duplex POST as Envoy opens it: the headers, then `body` without end of stream."""
    await call.write(headers_msg())
    await call.write(body_msg(body, False))


async def read(call, n: int) -> list[ProcessingResponse]:
    return [await asyncio.wait_for(call.read(), 10) for _ in range(n)]


def streamed(reply: ProcessingResponse, field="request_body") -> tuple[bytes, bool]:
    assert reply.WhichOneof("response") == field
    sr = getattr(reply, field).response.body_mutation.streamed_response
    assert getattr(reply, field).response.body_mutation.WhichOneof("mutation") == "streamed_response"
    return sr.body, sr.end_of_stream


async def send_request(call, mode=FDS, body: bytes | None = None, *, replies: int | None = None,
                       **headers) -> list[ProcessingResponse]:
    """A whole request as Envoy sends it in `mode`: the headers (`headers_msg` keywords; in
    BUFFERED mode their CONTINUE is read), then `body` (default: a completion) with end of
    stream. Returns the next `replies` replies, by default those of a routed request (FDS:
    the headers reply and the body; BUFFERED: the body reply)."""
    await call.write(headers_msg(mode, **headers))
    if mode == BUFFERED:
        await read(call, 1)
    await call.write(body_msg(completion() if body is None else body, True))
    return await read(call, replies or (2 if mode == FDS else 1))
