"""OpenTelemetry tracing, as the reference's `--tracing` (pkg/common/observability/tracing).

`init(enabled)` returns a `Tracing` (or None: off, or the SDK is not installed, which is
logged once). Nothing from opentelemetry is imported until tracing is on, and the
director's hot path pays one `is not None` check per hook when it is off.

Configuration is the standard OTEL_* environment, with the reference's defaults:
- resource: service.name "llm-d-epp" and service.version, overridden by OTEL_SERVICE_NAME
  and OTEL_RESOURCE_ATTRIBUTES;
- sampler: OTEL_TRACES_SAMPLER (default parentbased_traceidratio) with
  OTEL_TRACES_SAMPLER_ARG (default 0.1; unparsable or out of range: 0.1); an unknown
  sampler falls back to parentbased_traceidratio 0.1 with an error logged, as the reference;
- exporter: OTEL_TRACES_EXPORTER "otlp" = OTLP over gRPC (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT,
  default http://localhost:4317 in plaintext, _INSECURE, _CERTIFICATE, _HEADERS, _TIMEOUT,
  read by the exporter); unset or "console" = spans printed to stdout (the reference's
  default); "none" = no export (spans are still made, so trace context propagates);
- a batch span processor whose queue holds at most OTEL_BSP_MAX_QUEUE_SIZE spans
  (MAX_QUEUE_SIZE, the SDK's and the reference's default); a full queue drops spans;
  OTEL_BSP_MAX_EXPORT_BATCH_SIZE (cut to the queue size) and OTEL_BSP_SCHEDULE_DELAY likewise;
- propagation: W3C trace context and baggage, read from the request's headers and
  injected into the upstream request (traceparent, tracestate, baggage).

Spans per request, named as the reference's: "gateway.request" (server kind; parent
from the incoming traceparent; from the request headers to the end of the response, on
every path) and its child "gateway.request_orchestration" (the director's routing).
Attributes, set only on sampled spans: on the request span gen_ai.request.model (target
model), gen_ai.request.id, target_model, request_prio (the reference's keys), this picker's
llm_d.epp.* keys (ATTR_* below) and per-plugin time as
llm_d.epp.plugin.<ExtensionPoint>.<plugin name>.duration_ms (summed over the cycle); on
the orchestration span the pick (endpoints, destination, profile, outcome). Failures set
the error status (and code, dropped reason) on both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from epp.framework.headers import REQUEST_ID
from epp.timing import Observer

if TYPE_CHECKING:
    from epp.errors import InferenceError
    from epp.requestcontrol.director import RequestContext

log = logging.getLogger("epp.tracing")

DEFAULT_SERVICE_NAME = "llm-d-epp"  # the reference's runner default
DEFAULT_SAMPLER = "parentbased_traceidratio"
DEFAULT_SAMPLER_ARG = 0.1
MAX_QUEUE_SIZE = 2048  # spans waiting for export (bound; OTEL_BSP_MAX_QUEUE_SIZE overrides)
MAX_EXPORT_BATCH_SIZE = 512  # spans per export (OTEL_BSP_MAX_EXPORT_BATCH_SIZE; at most the queue)
SCHEDULE_DELAY_MS = 5000  # between exports (OTEL_BSP_SCHEDULE_DELAY)
HANDLERS_SCOPE = "llm-d-router/pkg/epp/handlers"  # instrumentation scopes, as the reference's
DIRECTOR_SCOPE = "llm-d-router/pkg/epp/requestcontrol"
REQUEST_SPAN = "gateway.request"
ORCHESTRATION_SPAN = "gateway.request_orchestration"

ATTR_INCOMING_MODEL = "llm_d.epp.request.incoming_model"
ATTR_OBJECTIVE = "llm_d.epp.request.objective"
ATTR_FAIRNESS_ID = "llm_d.epp.request.fairness_id"
ATTR_PROFILE = "llm_d.epp.scheduling.profile.name"  # the primary profile (reference key)
ATTR_ENDPOINTS = "llm_d.epp.scheduling.endpoints"  # picked endpoint names, primary first
ATTR_DESTINATION = "llm_d.epp.destination"  # host:port list handed to Envoy
ATTR_OUTCOME = "llm_d.epp.outcome"  # routed | completed | rejected | cancelled
ATTR_ERROR_CODE = "llm_d.epp.error.code"  # the error code of an immediate response
ATTR_DROPPED_REASON = "llm_d.epp.request.dropped_reason"  # as x-llm-d-request-dropped-reason
ATTR_STATUS = "http.response.status_code"
PLUGIN_ATTR = "llm_d.epp.plugin.{}.{}.duration_ms"
CLIENT_INPUT_LOGGERS = ("opentelemetry.baggage.propagation", "opentelemetry.trace.span",
                        "opentelemetry.trace.propagation.tracecontext")

_unavailable_logged = False


class TracingError(ValueError):
    """The OTEL_* environment asks for an exporter that cannot be built (start-up error)."""


def init(enabled: bool, env: Mapping[str, str] | None = None) -> Tracing | None:
    """The tracing of one picker (None when off or the SDK is missing)."""
    global _unavailable_logged
    if not enabled:
        return None
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        if not _unavailable_logged:
            _unavailable_logged = True
            log.warning("--tracing: the OpenTelemetry SDK is not installed (pip install opentelemetry-sdk "
                        "opentelemetry-exporter-otlp-proto-grpc); tracing is unavailable")
        return None
    env = os.environ if env is None else env
    provider = TracerProvider(sampler=sampler_from_env(env), resource=resource_from_env(env),
                              shutdown_on_exit=False)
    try:
        exporter = exporter_from_env(env)
    except Exception as e:  # noqa: BLE001 - the SDK raises what its env parsing raises
        named = ", ".join(sorted(k for k in env if k.startswith("OTEL_EXPORTER_OTLP")))[:300]
        raise TracingError(f"--tracing: cannot build the trace exporter from the OTEL_* environment "
                           f"({named or 'OTEL_TRACES_EXPORTER'}): {type(e).__name__}: {str(e)[:200]}") from None
    if exporter is not None:
        queue = _int(env.get("OTEL_BSP_MAX_QUEUE_SIZE"), MAX_QUEUE_SIZE)
        batch = min(_int(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), MAX_EXPORT_BATCH_SIZE), queue)
        delay = _int(env.get("OTEL_BSP_SCHEDULE_DELAY"), SCHEDULE_DELAY_MS)
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=queue, max_export_batch_size=batch,
                                                       schedule_delay_millis=delay))
    return Tracing(provider)


def _int(text: str | None, default: int) -> int:
    try:
        value = int(text) if text else default
    except ValueError:
        return default
    return value if value > 0 else default


def sampler_from_env(env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", DEFAULT_SAMPLER).strip().lower()
    try:
        ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", DEFAULT_SAMPLER_ARG))
    except ValueError:
        ratio = DEFAULT_SAMPLER_ARG
    if not 0.0 <= ratio <= 1.0:
        ratio = DEFAULT_SAMPLER_ARG
    samplers = {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    make = samplers.get(name)
    if make is None:
        log.error("OTEL_TRACES_SAMPLER=%s is not supported: using %s with ratio %s", name[:64],
                  DEFAULT_SAMPLER, DEFAULT_SAMPLER_ARG)
        return sampling.ParentBased(sampling.TraceIdRatioBased(DEFAULT_SAMPLER_ARG))
    return make()


def resource_from_env(env: Mapping[str, str]) -> Any:
    """service.name/version defaults, overridden by OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    try:
        from importlib.metadata import version

        build = version("epp")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source tree)
        build = "unknown"
    attrs: dict[str, Any] = {SERVICE_NAME: DEFAULT_SERVICE_NAME, SERVICE_VERSION: build}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            from urllib.parse import unquote

            attrs[key.strip()] = unquote(value.strip())
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        attrs[SERVICE_NAME] = name
    return Resource(attrs)


def exporter_from_env(env: Mapping[str, str]) -> Any:
    kind = env.get("OTEL_TRACES_EXPORTER", "console").strip().lower()
    log.info("tracing: trace exporter %s", kind[:64])
    if kind == "none":
        return None
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, TLS, headers, timeout: OTEL_EXPORTER_OTLP_* (read by the SDK)
    if kind != "console":
        log.error("OTEL_TRACES_EXPORTER=%s is not supported: printing spans to stdout", kind[:64])
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter()


class Tracing:
    """A picker's tracer provider, its propagator and the per-request span hooks."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        # The SDK's propagators log malformed or oversized client headers at WARNING, echoing
        # them (a baggage header of any length in full): client input is not the operator's
        # problem, and the reference's propagators drop it silently, so these do too.
        for name in CLIENT_INPUT_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        self.baggage = W3CBaggagePropagator()
        self.propagator = CompositePropagator([TraceContextTextMapPropagator(), self.baggage])
        self.handlers = provider.get_tracer(HANDLERS_SCOPE)
        self.director = provider.get_tracer(DIRECTOR_SCOPE)
        self._set_span = trace.set_span_in_context
        self._server = SpanKind.SERVER
        self._error = lambda text: Status(StatusCode.ERROR, text)
        self.collecting: dict[tuple[str, str], float] | None = None  # plugin times of the cycle running now

    def shutdown(self) -> None:
        """Export what is queued and stop the export thread."""
        self.provider.shutdown()

    def observer(self, inner: Observer | None) -> Observer:
        """The plugin-duration observer that also feeds the running cycle's sampled span. It
        carries `bind` (epp.timing) whenever the inner observer does, so tracing keeps the
        inner observer's bound fast path (one resolved series per plugin call)."""

        def collect(key: tuple[str, str], seconds: float) -> None:
            times = self.collecting
            if times is not None:
                times[key] = times.get(key, 0.0) + seconds

        def observe(point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
            if inner is not None:
                inner(point, plugin_type, plugin_name, seconds)
            collect((point, plugin_name), seconds)

        inner_bind = getattr(inner, "bind", None)
        if inner is None or inner_bind is not None:
            def bind(point: str, plugin_type: str, plugin_name: str) -> Callable[[], Callable[[float], None]]:
                key = (point, plugin_name)
                resolve_inner = inner_bind(point, plugin_type, plugin_name) if inner_bind is not None else None

                def resolve() -> Callable[[float], None]:
                    record_inner = resolve_inner() if resolve_inner is not None else None

                    def record(seconds: float) -> None:
                        if record_inner is not None:
                            record_inner(seconds)
                        collect(key, seconds)

                    return record

                return resolve

            observe.bind = bind  # type: ignore[attr-defined]
        return observe

    # ------------------------------------------------------------------ per request
    def start(self, headers: Mapping[str, str]) -> RequestTrace:
        """The request's server span, a child of the trace context its headers carry."""
        parent = self.propagator.extract(headers) if ("traceparent" in headers or "baggage" in headers) else None
        span = self.handlers.start_span(REQUEST_SPAN, context=parent, kind=self._server)
        return RequestTrace(self, span, parent)


class RequestTrace:
    """One request's spans; every method is safe to call on any path, in any order."""

    __slots__ = ("tracing", "span", "parent", "orchestration", "failed_code", "ended")

    def __init__(self, tracing: Tracing, span: Any, parent: Any) -> None:
        self.tracing = tracing
        self.span = span
        self.parent = parent
        self.orchestration: Any = None
        self.failed_code = ""
        self.ended = False

    def routing(self) -> None:
        """The director starts routing: the orchestration span (sampled requests only)."""
        if self.span.is_recording():
            t = self.tracing
            self.orchestration = t.director.start_span(ORCHESTRATION_SPAN, context=t._set_span(self.span),
                                                       kind=t._server)

    def collect(self) -> None:
        """The scheduling cycle starts: plugin times go to this request until `routed`/`failed`."""
        self.tracing.collecting = {} if self.span.is_recording() else None

    def _take_times(self) -> dict[tuple[str, str], float] | None:
        t = self.tracing
        times, t.collecting = t.collecting, None
        return times

    def routed(self, ctx: RequestContext) -> None:
        """The request has its endpoints: attributes, and the trace context for the upstream."""
        times = self._take_times()
        span = self.span
        inject(self.tracing, span, self.parent, ctx.upstream_headers)
        if not span.is_recording():
            return
        r, result = ctx.request, ctx.result
        pick: dict[str, Any] = {ATTR_OUTCOME: "routed", ATTR_DESTINATION: ctx.destination,
                                ATTR_ENDPOINTS: [e.name for e in ctx.targets]}
        if result is not None and result.primary_profile:
            pick[ATTR_PROFILE] = result.primary_profile
        orch = self.orchestration
        if orch is not None:  # the routing span: the pick; the request span: everything
            orch.set_attributes(pick)
            orch.end()
            self.orchestration = None
        if r is not None:
            pick.update(request_attributes(r))
        if times:
            for (point, name), seconds in times.items():
                pick[PLUGIN_ATTR.format(point, name)] = seconds * 1000.0
        span.set_attributes(pick)

    def failed(self, ctx: RequestContext, error: InferenceError) -> None:
        """The request ends with an immediate response (rejected, dropped, bad request...)."""
        if self.tracing.collecting is not None:
            self._take_times()
        self.failed_code = error.code
        span = self.span
        if not span.is_recording():
            return
        status = self.tracing._error(f"{error.code}: {error.message}")
        attrs: dict[str, Any] = {ATTR_OUTCOME: "rejected", ATTR_ERROR_CODE: error.code}
        if error.reason:
            attrs[ATTR_DROPPED_REASON] = error.reason
        if ctx.request is not None:
            attrs.update(request_attributes(ctx.request))
        for s in (self.orchestration, span):
            if s is not None:
                s.set_attributes(attrs)
                s.set_status(status)
        if self.orchestration is not None:
            self.orchestration.end()
            self.orchestration = None

    def end(self, ctx: RequestContext, cancelled: bool = False) -> None:
        """The request's life ended (complete, on every path)."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        if span.is_recording():
            if self.orchestration is not None:  # routing never finished (the stream went away)
                self.orchestration.end()
                self.orchestration = None
            status = ctx.response.status
            if status:
                span.set_attribute(ATTR_STATUS, status)
            if not self.failed_code:
                span.set_attribute(ATTR_OUTCOME, "cancelled" if cancelled else "completed")
                if status and status != 200:  # the reference: a non-200 answer is a ModelServerError
                    span.set_status(self.tracing._error("ModelServerError"))
        span.end()


def inject(tracing: Tracing, span: Any, parent: Any, headers: dict[str, str]) -> None:
    """The span's W3C trace context (traceparent, tracestate) written as the trace-context
    propagator writes it, without its per-call context lookups; baggage (only ever the
    incoming request's) through the propagator when the request carried a parent context."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return
    headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
    if sc.trace_state:
        headers["tracestate"] = sc.trace_state.to_header()
    if parent is not None:
        tracing.baggage.inject(headers, context=parent)


def request_attributes(r: Any) -> dict[str, Any]:
    """The request's identity and objective, under the reference's keys and this picker's."""
    attrs: dict[str, Any] = {"target_model": r.target_model, "request_prio": r.priority,
                             ATTR_INCOMING_MODEL: r.incoming_model}
    if r.target_model:
        attrs["gen_ai.request.model"] = r.target_model
    rid = r.headers.get(REQUEST_ID) if r.headers else None
    if rid:
        attrs["gen_ai.request.id"] = rid
    if r.objective:
        attrs[ATTR_OBJECTIVE] = r.objective
    if r.fairness_id:
        attrs[ATTR_FAIRNESS_ID] = r.fairness_id
    return attrs


def observer(tracing: Tracing | None, inner: Observer | None) -> Observer | None:
    """The scheduling cycle's plugin observer: `inner` itself when tracing is off."""
    return inner if tracing is None else tracing.observer(inner)
