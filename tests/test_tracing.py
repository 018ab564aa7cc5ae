"""Tracing (--tracing): the request span and its attributes, W3C trace context in and out,
error status on failures, the OTEL_* configuration, and nothing at all when off."""

from __future__ import annotations

import logging
import subprocess
import sys

import orjson
import pytest
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode

from epp import tracing
from epp.assembly import load_plugin_set
from epp.errors import REJECTED_SATURATED, InferenceError
from epp.requestcontrol.director import Director, RequestContext
from tests.extproc import (  # not the autouse `transport` fixture: traced_harness picks the transport
    BUFFERED,
    Harness,
    body_msg,
    completion,
    headers_msg,
    read,
    response_body_msg,
    response_headers_msg,
    send_request,
    set_headers,
)
from tests.servers import eventually
from tests.test_director import OpenGate, datastore

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: max-score-picker
"""

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def traced(sampler=ALWAYS_ON) -> tuple[tracing.Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracing.Tracing(provider), exporter


def director(t: tracing.Tracing | None, endpoints: int = 2) -> Director:
    plugins = load_plugin_set(CONFIG, observe=tracing.observer(t, None))
    return Director(datastore(endpoints), plugins, admission=OpenGate(), tracing=t)


async def serve(d: Director, headers: dict[str, str], status: int = 200) -> RequestContext:
    """One request from headers to the end of its response, as the ext_proc stream drives it."""
    ctx = d.new_context(dict(headers))
    try:
        await d.route(ctx, orjson.dumps({"model": "m", "prompt": "hello"}), None)
    except InferenceError as e:
        d.failed(ctx, e)
        return ctx
    d.response_headers(ctx, status, {"content-type": "application/json"}, "")
    d.response_body(ctx, b'{"usage": {"prompt_tokens": 1, "completion_tokens": 1}}', True)
    d.complete(ctx)
    return ctx


def parent_of(traceparent: str) -> tuple[str, str, bool]:
    """(trace id, span id, sampled) of a W3C traceparent value."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, bool(int(flags, 16) & 1)


def ids(span) -> tuple[str, str]:
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def spans(exporter: InMemorySpanExporter) -> dict[str, object]:
    return {s.name: s for s in exporter.get_finished_spans()}


async def test_request_span_carries_the_pick_and_plugin_times():
    t, exporter = traced()
    d = director(t)
    ctx = await serve(d, {"x-request-id": "req-1", "x-llm-d-inference-objective": "chat"})
    got = spans(exporter)
    assert set(got) == {"gateway.request", "gateway.request_orchestration"}
    span, orch = got["gateway.request"], got["gateway.request_orchestration"]
    assert span.kind is SpanKind.SERVER and span.parent is None
    assert orch.parent.span_id == span.context.span_id and orch.context.trace_id == span.context.trace_id
    a = span.attributes
    picked = ctx.targets[0]
    assert a[tracing.ATTR_ENDPOINTS] == (picked.name,)
    assert a[tracing.ATTR_DESTINATION] == picked.hostport
    assert a[tracing.ATTR_PROFILE] == ctx.result.primary_profile
    assert a["gen_ai.request.model"] == a["target_model"] == "m"
    assert a["gen_ai.request.id"] == "req-1"
    assert a["request_prio"] == 0
    assert a[tracing.ATTR_OBJECTIVE] == "chat"
    assert a[tracing.ATTR_OUTCOME] == "completed" and a[tracing.ATTR_STATUS] == 200
    assert span.status.status_code is StatusCode.UNSET
    # every configured scheduling plugin's time, under its extension point
    times = {k: v for k, v in a.items() if k.startswith("llm_d.epp.plugin.")}
    assert "llm_d.epp.plugin.Scorer.queue-scorer.duration_ms" in times
    assert "llm_d.epp.plugin.Picker.max-score-picker.duration_ms" in times
    assert all(v > 0 for v in times.values())
    assert orch.attributes[tracing.ATTR_ENDPOINTS] == (picked.name,)
    # the upstream request carries this span's context
    assert parent_of(ctx.upstream_headers["traceparent"]) == (*ids(span), True)
    assert t.collecting is None


async def test_span_joins_the_callers_trace_and_passes_it_upstream():
    t, exporter = traced(tracing.sampler_from_env({"OTEL_TRACES_SAMPLER_ARG": "0"}))  # root: never sampled
    d = director(t)
    ctx = await serve(d, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=1",
                          "baggage": "tenant=a"})
    span = spans(exporter)["gateway.request"]
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID and span.parent.is_remote
    up = ctx.upstream_headers
    assert parent_of(up["traceparent"]) == (TRACE_ID, ids(span)[1], True)
    assert up["tracestate"] == "vendor=1" and up["baggage"] == "tenant=a"


async def test_unsampled_request_still_propagates_and_records_nothing():
    t, exporter = traced(tracing.sampler_from_env({"OTEL_TRACES_SAMPLER_ARG": "0"}))
    d = director(t)
    ctx = await serve(d, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert exporter.get_finished_spans() == ()
    trace_id, span_id, sampled = parent_of(ctx.upstream_headers["traceparent"])
    assert trace_id == TRACE_ID and span_id != PARENT_ID and not sampled
    ctx = await serve(d, {})  # a root request with ratio 0
    assert exporter.get_finished_spans() == ()
    trace_id, _, sampled = parent_of(ctx.upstream_headers["traceparent"])
    assert trace_id != TRACE_ID and not sampled


@pytest.mark.parametrize("header", ["garbage", "00-" + "0" * 32 + "-" + PARENT_ID + "-01",
                                    "ff-" + TRACE_ID + "-" + PARENT_ID + "-01\r\nx: y"])
async def test_a_malformed_traceparent_starts_a_new_trace(header):
    t, exporter = traced()
    ctx = await serve(director(t), {"traceparent": header})
    span = spans(exporter)["gateway.request"]
    assert span.parent is None and f"{span.context.trace_id:032x}" != TRACE_ID
    assert parent_of(ctx.upstream_headers["traceparent"]) == (*ids(span), True)


async def test_failure_sets_error_status_and_the_code():
    t, exporter = traced()
    d = director(t, endpoints=0)
    ctx = await serve(d, {})
    got = spans(exporter)
    span, orch = got["gateway.request"], got["gateway.request_orchestration"]
    for s in (span, orch):
        assert s.status.status_code is StatusCode.ERROR
        assert s.attributes[tracing.ATTR_OUTCOME] == "rejected"
        assert s.attributes[tracing.ATTR_ERROR_CODE] == "ServiceUnavailable"
    assert "traceparent" not in ctx.upstream_headers
    assert t.collecting is None


async def test_dropped_reason_is_an_attribute():
    t, exporter = traced()
    d = director(t)
    ctx = d.new_context({})
    d.failed(ctx, InferenceError("ResourceExhausted", "shed", REJECTED_SATURATED))
    span = spans(exporter)["gateway.request"]
    assert span.attributes[tracing.ATTR_DROPPED_REASON] == REJECTED_SATURATED
    assert span.attributes[tracing.ATTR_ERROR_CODE] == "ResourceExhausted"
    assert span.status.status_code is StatusCode.ERROR


async def test_model_server_error_and_cancellation():
    t, exporter = traced()
    d = director(t)
    await serve(d, {}, status=503)
    span = spans(exporter)["gateway.request"]
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "ModelServerError"
    assert span.attributes[tracing.ATTR_STATUS] == 503
    exporter.clear()
    ctx = d.new_context({})
    await d.route(ctx, orjson.dumps({"model": "m", "prompt": "x"}), None)
    d.complete(ctx, cancelled=True)  # the stream went away before the response
    d.complete(ctx)  # idempotent: the span ends once
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "gateway.request"]
    assert span.attributes[tracing.ATTR_OUTCOME] == "cancelled"
    assert tracing.ATTR_STATUS not in span.attributes
    assert span.status.status_code is StatusCode.UNSET  # as the reference: a cancelled stream is no error


async def test_off_makes_no_span_and_no_header():
    d = director(None)
    ctx = await serve(d, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert ctx.trace is None and "traceparent" not in ctx.upstream_headers
    assert tracing.init(False) is None
    assert tracing.observer(None, None) is None


def test_off_imports_nothing_from_opentelemetry():
    code = ("import sys; from epp.server import PickerServer; from epp.options import parse_args;"
            "p = PickerServer(parse_args(['--tracing=false', '--endpoints=127.0.0.1:1'])); assert p.tracing is None;"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_sdk_is_logged_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    monkeypatch.setattr(tracing, "_unavailable_logged", False)
    with caplog.at_level(logging.WARNING, logger="epp.tracing"):
        assert tracing.init(True) is None
        assert tracing.init(True) is None
    assert len([r for r in caplog.records if "tracing is unavailable" in r.getMessage()]) == 1


def test_sampler_from_env_defaults_as_the_reference():
    default = tracing.sampler_from_env({}).get_description()
    assert default.startswith("ParentBased{root:TraceIdRatioBased{0.1}")
    for bad in ("x", "2", "-1"):
        d = tracing.sampler_from_env({"OTEL_TRACES_SAMPLER_ARG": bad}).get_description()
        assert d.startswith("ParentBased{root:TraceIdRatioBased{0.1}")
    assert tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "unknown"}).get_description() == default
    assert tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "always_on"}).get_description() == "AlwaysOnSampler"
    half = tracing.sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    assert half.get_description() == "TraceIdRatioBased{0.5}"


def test_resource_and_exporter_from_env():
    r = tracing.resource_from_env({})
    assert r.attributes["service.name"] == "llm-d-epp"
    r = tracing.resource_from_env({"OTEL_SERVICE_NAME": "llm-d-router/epp",
                                   "OTEL_RESOURCE_ATTRIBUTES": "k8s.namespace.name=ns,service.name=x"})
    assert r.attributes["service.name"] == "llm-d-router/epp" and r.attributes["k8s.namespace.name"] == "ns"
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    assert isinstance(tracing.exporter_from_env({}), ConsoleSpanExporter)  # the reference's default
    assert isinstance(tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "otlp"}), OTLPSpanExporter)
    assert tracing.exporter_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None


def test_init_builds_a_bounded_batch_processor():
    t = tracing.init(True, {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_MAX_QUEUE_SIZE": "7"})
    assert t is not None
    try:
        (processor,) = t.provider._active_span_processor._span_processors
        assert type(processor).__name__ == "BatchSpanProcessor"
        assert processor._batch_processor._max_queue_size == 7
    finally:
        t.shutdown()
    t = tracing.init(True, {"OTEL_TRACES_EXPORTER": "console"})
    try:
        (processor,) = t.provider._active_span_processor._span_processors
        assert processor._batch_processor._max_queue_size == tracing.MAX_QUEUE_SIZE
    finally:
        t.shutdown()


async def test_explain_makes_no_span():
    started: list[str] = []

    class Starts(SpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            started.append(span.name)

    t, exporter = traced()
    t.provider.add_span_processor(Starts())
    d = director(t)
    result = d.explain({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                       orjson.dumps({"model": "m", "prompt": "hello"}))
    assert result.targets  # it did pick
    assert started == [] and t.collecting is None
    await serve(d, {})  # while a routed request does start its spans
    assert started == ["gateway.request", "gateway.request_orchestration"]


@pytest.mark.parametrize("env", [{"OTEL_EXPORTER_OTLP_TIMEOUT": "x"}, {"OTEL_EXPORTER_OTLP_COMPRESSION": "zzz"}])
def test_an_unbuildable_exporter_stops_start_up_with_one_line(env, monkeypatch):
    from epp.options import parse_args
    from epp.server import PickerServer, StartupError

    for key, value in {"OTEL_TRACES_EXPORTER": "otlp", **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StartupError, match=r"^--tracing: cannot build the trace exporter .*OTEL_EXPORTER_OTLP"):
        PickerServer(parse_args(["--endpoints=127.0.0.1:1"]))


# ------------------------------------------------------------------ through the ext_proc stream (both transports)
@pytest.fixture(params=["grpcio", "native"])
def traced_harness(request):
    class TracedHarness(Harness):
        transport = request.param

        def __init__(self) -> None:
            super().__init__()
            from epp.handlers.stream import ExtProcHandler

            self.tracing, self.exporter = traced()
            self.pipeline.observe = self.tracing.observer(self.pipeline.observe)
            self.director = Director(self.datastore, self.pipeline, admission=self.admission,
                                     telemetry=self.telemetry, tracing=self.tracing)
            self.ext_proc = ExtProcHandler(self.director)

        def request_spans(self) -> list:
            return [s for s in self.exporter.get_finished_spans() if s.name == "gateway.request"]

        async def request_span(self):
            # the server side sees the cancel a moment after the client
            await eventually(self.request_spans, "the request span to end", timeout=5)
            return self.request_spans()[0]

    return TracedHarness


async def test_routing_reply_carries_traceparent_and_a_full_exchange_completes(traced_harness):
    async with traced_harness() as h:
        call = h.stream()
        reply, _ = await send_request(call, extra={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        up = set_headers(reply.request_headers.response)
        await call.write(response_headers_msg())
        await call.write(response_body_msg(b'{"model": "m1"}', True))
        await read(call, 2)
        await call.done_writing()
        span = await h.request_span()
        assert parent_of(up["traceparent"]) == (TRACE_ID, ids(span)[1], True)
        assert span.attributes[tracing.ATTR_OUTCOME] == "completed"
        assert span.attributes[tracing.ATTR_DESTINATION] == up["x-gateway-destination-endpoint"]


@pytest.mark.parametrize("phase", ["body", "response_body"])
async def test_a_cancelled_stream_ends_the_span(traced_harness, phase):
    async with traced_harness() as h:
        call = h.stream()
        if phase == "body":  # buffered: the headers' reply tells the picker has the request
            await call.write(headers_msg(BUFFERED))
            await read(call, 1)
        else:
            await call.write(headers_msg())
        await call.write(body_msg(completion(), phase != "body"))
        if phase == "response_body":
            await read(call, 2)
            await call.write(response_headers_msg())
            await read(call, 1)
        call.cancel()
        span = await h.request_span()
        assert span.attributes[tracing.ATTR_OUTCOME] == "cancelled"
        assert (tracing.ATTR_DESTINATION in span.attributes) == (phase == "response_body")
        await h.assert_released()


async def test_hostile_trace_headers_are_dropped_without_echoing_them_to_the_log(caplog):
    t, exporter = traced()
    d = director(t)
    huge = ",".join(f"k{i}=v{i}" for i in range(5000))
    hostile = [{"tracestate": huge, "baggage": huge},
               {"tracestate": "a=" + "x" * 300, "baggage": "k=" + "v" * 5000},
               {"tracestate": ",".join(f"k{i}=v" for i in range(40)), "baggage": "bad entry,\u00e9=x"}]
    with caplog.at_level(logging.DEBUG):
        for extra in hostile:
            ctx = await serve(d, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", **extra})
            assert parent_of(ctx.upstream_headers["traceparent"])[0] == TRACE_ID  # the valid part still counts
            assert len(ctx.upstream_headers.get("tracestate", "")) <= 8192
            assert len(ctx.upstream_headers.get("baggage", "")) <= 8192
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING]
    assert sum(len(r.getMessage()) for r in caplog.records) < 20000


def test_the_tracing_observer_keeps_the_inner_observers_bound_fast_path():
    from types import SimpleNamespace

    from epp import timing

    t, _ = traced()
    seen: list[tuple[str, ...]] = []

    def inner(point, plugin_type, plugin_name, seconds):
        seen.append(("per-call", point, plugin_type, plugin_name))

    inner.bind = lambda point, ptype, name: lambda: lambda seconds: seen.append(("bound", point, ptype, name))
    call = timing.timed("Scorer", SimpleNamespace(type_name="queue-scorer", name="q"), lambda: 7, t.observer(inner))
    t.collecting = {}
    assert call() == 7 and call() == 7
    assert seen == [("bound", "Scorer", "queue-scorer", "q")] * 2  # the inner's bound series, not per-call
    assert list(t.collecting) == [("Scorer", "q")] and t.collecting[("Scorer", "q")] > 0  # and the span's sum
    t.collecting = None
    assert call() == 7 and len(seen) == 3  # no sampled cycle: the inner series alone
    assert not hasattr(t.observer(lambda *a: None), "bind")  # an inner without bind keeps the per-call path
