"""--tracing through the real Envoy: `epp serve` exports the request's span over OTLP/gRPC to
an in-process collector (the client's trace id, the pick as an attribute), and the
upstream model server receives a traceparent naming the picker's span."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
WAIT = 20.0  # seconds for a span to reach the collector (the batch delay is 50 ms)


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector: every exported span, with its resource's attributes."""

    def __init__(self) -> None:
        self.spans: queue.Queue = queue.Queue()

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.spans.put((resource, ss.scope.name, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, name: str) -> tuple[dict, str, object]:
        while True:
            resource, scope, span = self.spans.get(timeout=WAIT)
            if span.name == name:
                return resource, scope, span


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, port
    finally:
        server.stop(0)


class Upstream(BaseHTTPRequestHandler):
    """A model server that records the headers of every request it serves."""

    seen: queue.Queue = queue.Queue()

    def do_GET(self):  # noqa: N802 - /metrics, /v1/models: empty answers
        body = b"" if self.path.startswith("/metrics") else b'{"object": "list", "data": []}'
        self._reply(body, "text/plain" if self.path.startswith("/metrics") else "application/json")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", "0")))
        Upstream.seen.put({k.lower(): v for k, v in self.headers.items()})
        self._reply(json.dumps({"id": "c1", "object": "text_completion", "model": "m1", "created": 0,
                                "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}).encode(),
                    "application/json")

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("mode", ["full-duplex", "buffered"])
def test_request_span_reaches_the_collector_and_the_upstream_gets_its_context(
        mode, collector, upstream, picker, envoy, monkeypatch):
    servicer, port = collector
    # the chart's tracing env, with a ratio of 0: only the client's sampled trace is exported
    for key, value in {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                       "OTEL_SERVICE_NAME": "llm-d-router/epp", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                       "OTEL_TRACES_SAMPLER_ARG": "0", "OTEL_BSP_SCHEDULE_DELAY": "50",
                       "OTEL_RESOURCE_ATTRIBUTES": "k8s.namespace.name=e2e"}.items():
        monkeypatch.setenv(key, value)  # the picker subprocess inherits them
    while not Upstream.seen.empty():
        Upstream.seen.get_nowait()
    p = picker(endpoints=[upstream], extra_flags=["--tracing=true"])
    env = envoy(mode, p)

    status, _, _ = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "hello", "max_tokens": 1},
                        headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "x-request-id": "trace-e2e"})
    assert status == 200
    resource, scope, span = servicer.wait_for("gateway.request")
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CLIENT_SPAN
    assert resource["service.name"] == "llm-d-router/epp" and resource["k8s.namespace.name"] == "e2e"
    assert scope == "llm-d-router/pkg/epp/handlers"
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["llm_d.epp.destination"].string_value == upstream
    assert attrs["gen_ai.request.model"].string_value == "m1"
    assert attrs["gen_ai.request.id"].string_value == "trace-e2e"
    assert attrs["http.response.status_code"].int_value == 200
    assert attrs["llm_d.epp.outcome"].string_value == "completed"
    assert any(k.startswith("llm_d.epp.plugin.Picker.") for k in attrs)
    # the model server saw the picker's span as its parent, in the client's trace
    headers = Upstream.seen.get(timeout=WAIT)
    version, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (trace_id, parent_id) == (TRACE_ID, span.span_id.hex()) and int(flags, 16) & 1

    # an untraced request under ratio 0 is not exported, yet carries a (not sampled) context upstream
    status, _, _ = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "again", "max_tokens": 1})
    assert status == 200
    headers = Upstream.seen.get(timeout=WAIT)
    _, trace_id, _, flags = headers["traceparent"].split("-")
    assert trace_id != TRACE_ID and not int(flags, 16) & 1
