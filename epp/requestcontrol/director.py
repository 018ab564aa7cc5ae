"""Request control around one scheduling cycle (reference scheduling.md "Request flow").

parse -> model rewrite -> objective & priority -> candidates (subset hint) -> admission
-> plugins.run_cycle -> in-flight accounting -> response hooks -> release, exactly once.

The director knows nothing about gRPC or Envoy: the ext_proc layer hands it headers and
bytes and gets back a `RequestContext` describing where the request goes.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from epp.datalayer.datastore import Datastore
from epp.errors import REJECTED_NO_ENDPOINTS, InferenceError, service_unavailable
from epp.framework import Endpoint, InferenceRequest, Parser, ResponseInfo, SchedulingResult
from epp.framework.datakeys import LatencyPredictions, PrefixCacheMatchInfo
from epp.logsafe import clean
from epp.netaddr import split_list
from epp.requestcontrol import headers as control
from epp.requestcontrol.contracts import AdmissionGate, Release, RequestPlugins, ResponseHook
from epp.requestcontrol.explain import ExplainResult
from epp.requestcontrol.inflight import InFlightCharge
from epp.requestcontrol.parsers import ParserChain, default_parsers
from epp.requestcontrol.parsers.common import dump_bytes
from epp.requestcontrol.responses import ModelNameRestorer, UsageParser
from epp.scheduling.scheduler import SchedulingTrace
from epp.telemetry import RequestSeries, Telemetry, pool_models
from epp.tracing import RequestTrace, Tracing

log = logging.getLogger("epp.requestcontrol.director")

REQUEST_ID_HEADER = control.REQUEST_ID


def rewritten_body(request: InferenceRequest) -> bytes:
    """The parsed JSON body with `model` set to the request's target model (after a rewrite).
    Parsers that forward the body unparsed leave `body` None: their bodies are not rewritten,
    as the reference rewrites only parsed payload maps."""
    data = dict(request.body or {})
    data["model"] = request.target_model
    return dump_bytes(data)


def subset_ips(hint: Sequence[str]) -> frozenset[str]:
    """IPs of a subset hint's "ip:port" entries (IPv6 bracketed or bare)."""
    return frozenset(host for host, _ in split_list(hint))


@dataclass(slots=True)
class RequestContext:
    """One request's life in the picker, from headers to the end of the response."""

    headers: dict[str, str]
    request_id: str = ""  # the client's x-request-id (or the generated one), escaped for logs
    generated_request_id: bool = False
    key: str = ""  # the picker's own id for this request: InferenceRequest.request_id, plugins' keys
    model_label: str = ""  # the request's model and target model as metric labels (bounded)
    target_label: str = ""
    start: float = 0.0
    request: InferenceRequest | None = None
    result: SchedulingResult | None = None
    targets: list[Endpoint] = field(default_factory=list)
    destination: str = ""  # comma-joined hostports, primary first
    scores: dict[str, float] | None = None  # hostport -> primary profile's total, with --emit-endpoint-scores
    upstream_headers: dict[str, str] = field(default_factory=dict)  # to set on the upstream request
    new_body: bytes | None = None  # set when a model rewrite changed the body
    release: Release | None = None
    charge: InFlightCharge | None = None  # what this request counts on its primary endpoint
    response: ResponseInfo = field(default_factory=ResponseInfo)
    response_bytes: int = 0
    first_chunk_at: float = 0.0
    last_chunk_at: float = 0.0  # streaming: for the inter-chunk latency
    streaming: bool = False  # the request asked for a stream or the response is SSE (the reference's rule)
    series: RequestSeries | None = None  # the request's metric recorders
    response_time: float = 0.0  # picker time on the response path, seconds
    response_headers_at: float = 0.0
    rewrite_name: str | None = None  # the InferenceModelRewrite that chose the target model, if one did
    usage: UsageParser | None = None
    restorer: ModelNameRestorer | None = None
    completed: bool = False
    trace: RequestTrace | None = None  # the request's spans, with --tracing

    @property
    def primary(self) -> Endpoint | None:
        return self.targets[0] if self.targets else None


class Director:
    """One request's control flow. `plugins` is the configured plugin set (scheduling
    cycle and response hooks); `admission` is the flow-control gate, built by the caller;
    `parsers` the request parsers in requestHandler order (None: the reference's default
    list, openai, anthropic, vllmhttp, passthrough)."""

    def __init__(self, datastore: Datastore, plugins: RequestPlugins, *, admission: AdmissionGate,
                 telemetry: Telemetry | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic, staleness: float | None = None,
                 parsers: Sequence[Parser] | None = None, tracing: Tracing | None = None,
                 emit_endpoint_scores: bool = False) -> None:
        self.datastore = datastore
        self.parsers = ParserChain(default_parsers() if parsers is None else parsers)
        # An endpoint whose scrapes have failed for longer than this is presumed down
        # (static endpoints have no readiness probe to take them out); None = never.
        self.staleness = staleness
        self.plugins = plugins
        self.admission = admission
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.telemetry.model_labels.known = lambda: pool_models(datastore)
        self.parsers.observe = self.telemetry.plugin_observer()  # RequestParsing plugin durations
        self.rng = rng or random.Random()
        self.clock = clock
        self._ids = itertools.count(1)
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.tracing = tracing  # None: off (the scheduling cycle's observer is the caller's to wrap)
        # --emit-endpoint-scores: carry the primary profile's scores (the scheduler must collect them) to ctx
        self.emit_endpoint_scores = emit_endpoint_scores

    # ------------------------------------------------------------------ request phase
    def new_context(self, headers: dict[str, str], traced: bool = True) -> RequestContext:
        ctx = RequestContext(headers=headers, start=self.clock())
        rid = headers.get(REQUEST_ID_HEADER)
        if not rid:
            rid = str(uuid.uuid4())
            headers[REQUEST_ID_HEADER] = rid
            ctx.generated_request_id = True
        # The client's id is for logs and headers only: two requests may share it, so
        # accounting keys on an id the picker hands out.
        ctx.request_id = clean(rid)
        ctx.key = f"{next(self._ids)}"
        if traced and self.tracing is not None:  # explain (traced=False) makes no span
            ctx.trace = self.tracing.start(headers)
        return ctx

    def prepare(self, ctx: RequestContext, body: bytes) -> InferenceRequest:
        """Parse, rewrite the model, resolve the objective (no side effects on the pool)."""
        headers = ctx.headers
        if body:
            request = self.parsers.parse(body, headers, ctx.key)
        else:  # bodiless (e.g. GET /v1/models): routed on headers alone
            request = InferenceRequest(request_id=ctx.key, target_model="", incoming_model="", kind="none",
                                       prompt_text="", headers=headers)
        control.apply(request, headers)
        if request.incoming_model:
            override = control.model_name_rewrite(headers)
            choice = None if override else self.datastore.rewrite_choice(request.incoming_model, self.rng)
            if choice is not None:
                ctx.rewrite_name = choice[0]
            target = override or (choice[1] if choice is not None else None)
            if target and target != request.incoming_model:
                request.target_model = target
        if request.objective:
            objective = self.datastore.objectives.get(request.objective)
            request.priority = objective.priority if objective is not None else 0
        return request

    def candidates(self, subset: Sequence[str] | None) -> Sequence[Endpoint]:
        endpoints = self.datastore.endpoints()
        if subset is not None:
            if not subset:
                raise service_unavailable("endpoint subset hint is empty", REJECTED_NO_ENDPOINTS)
            ips = subset_ips(subset)
            endpoints = [e for e in endpoints if e.address in ips]
            if not endpoints:
                raise service_unavailable("no pool endpoint matches the endpoint subset hint", REJECTED_NO_ENDPOINTS)
        return self.reachable(endpoints)

    def reachable(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """Drop endpoints whose metrics scrapes have been failing for longer than the
        staleness threshold, unless that leaves none (then metrics, not servers, are
        the likelier problem)."""
        if self.staleness is None:
            return endpoints
        cutoff = self.clock() - self.staleness
        live = [e for e in endpoints if e.metrics.ok or e.metrics.update_time > cutoff]
        return live if live and len(live) < len(endpoints) else endpoints

    async def route(self, ctx: RequestContext, body: bytes, subset: Sequence[str] | None) -> None:
        """Schedule the request; on return ctx.destination is set. Raises InferenceError.
        After a successful admission, `complete(ctx)` must be called exactly once."""
        if ctx.trace is not None:
            ctx.trace.routing()
        request = ctx.request = self.prepare(ctx, body)
        tel = self.telemetry
        labels = tel.model_labels
        model = ctx.model_label = labels(request.incoming_model)
        target = ctx.target_label = labels(request.target_model)
        series = ctx.series = tel.series(model, target, request.fairness_id, request.priority)
        ctx.streaming = request.stream
        if request.target_model != request.incoming_model:
            ctx.new_body = rewritten_body(request)
        if ctx.rewrite_name is not None:  # a rule decided (the reference counts rules, not the header)
            tel.model_rewrite_decisions.get(ctx.rewrite_name, model, target).inc()
        candidates = self.candidates(subset)
        ctx.release = await self.admission.admit(request, candidates)
        if not candidates:  # queued while the pool had no endpoint (flow control): route to those there now
            candidates = self.candidates(subset)
        if self.plugins.prefetches:  # e.g. token-producer's render call, bounded by the producer
            await self.plugins.prefetch(request)
        t0 = time.perf_counter()
        try:
            if ctx.trace is not None:
                ctx.trace.collect()
            _, result = self.plugins.run_cycle(request, candidates)
        except InferenceError:
            tel.scheduled(target, time.perf_counter() - t0, ok=False)
            raise
        targets = result.targets
        tel.scheduled(target, time.perf_counter() - t0, targets[0] if targets else None)
        if not targets:
            raise service_unavailable("no endpoint picked for the request")
        ctx.result = result
        ctx.targets = targets
        ctx.destination = result.destination()
        if self.emit_endpoint_scores:
            primary = result.profile_results.get(result.primary_profile)
            ctx.scores = primary.scores if primary is not None else None
        if result.headers:
            ctx.upstream_headers.update(result.headers)
        if ctx.trace is not None:  # traceparent for the upstream request, attributes
            ctx.trace.routed(ctx)
        ctx.charge = InFlightCharge.add(targets[0], request)
        series.total.inc()
        series.size.observe(request.size_bytes)
        series.running.inc()
        tel.request_processing.observe(self.clock() - ctx.start)
        if self._debug:
            log.debug("routed request_id=%s model=%s target_model=%s endpoint=%s", ctx.request_id,
                      clean(request.incoming_model), clean(request.target_model), ctx.destination)

    def failed(self, ctx: RequestContext, error: InferenceError) -> None:
        """A request ended with an ImmediateResponse: count it and release what it held."""
        r = ctx.request
        tel = self.telemetry
        if ctx.series is not None:
            ctx.series.error(error.code)
        else:  # failed before the request was parsed
            tel.request_error(ctx.model_label, ctx.target_label, error.code)
        if not ctx.destination:  # a request-phase failure: its processing time ends here
            tel.request_processing.observe(self.clock() - ctx.start)
        if ctx.trace is not None:
            ctx.trace.failed(ctx, error)
        log.info("request failed request_id=%s model=%s code=%s: %s", ctx.request_id,
                 clean(r.incoming_model if r else ""), error.code, clean(error.message))
        self.complete(ctx)

    # ------------------------------------------------------------------ response phase
    def response_headers(self, ctx: RequestContext, status: int, headers: Mapping[str, str],
                         served: str) -> dict[str, str]:
        """Response headers arrived; returns headers plugins want set on the response."""
        t0 = time.perf_counter()
        ctx.response_headers_at = self.clock()
        info = ctx.response
        info.status = status
        info.headers = headers
        info.served_endpoint = served or (ctx.targets[0].hostport if ctx.targets else "")
        sse = "text/event-stream" in headers.get("content-type", "")
        ctx.streaming = ctx.streaming or sse
        ctx.usage = UsageParser(sse=sse)
        r = ctx.request
        if r is not None and r.target_model != r.incoming_model and r.incoming_model:
            ctx.restorer = ModelNameRestorer(r.target_model, r.incoming_model, sse)
        if ctx.targets and r is not None:
            self._hook(self.plugins.response_received, ctx, info)
        ctx.response_time += time.perf_counter() - t0
        return info.set_headers

    def response_body(self, ctx: RequestContext, chunk: bytes, eos: bool) -> bytes | None:
        """A response body chunk; returns replacement bytes when the model name is restored."""
        t0 = time.perf_counter()
        if not ctx.first_chunk_at and chunk:
            ctx.first_chunk_at = self.clock()
        if chunk and ctx.streaming and ctx.series is not None:
            now = self.clock()
            if ctx.last_chunk_at:
                ctx.series.itl.observe(now - ctx.last_chunk_at)
            ctx.last_chunk_at = now
        ctx.response_bytes += len(chunk)
        if ctx.usage is None:
            ctx.usage = UsageParser()
        ctx.usage.feed(chunk, eos)
        r = ctx.request
        if r is not None and ctx.targets:
            info = ctx.response
            info.end_of_stream = eos
            self._hook(self.plugins.response_streaming, ctx, info)
        out = ctx.restorer.feed(chunk, eos) if ctx.restorer is not None else None
        ctx.response_time += time.perf_counter() - t0
        return out

    def complete(self, ctx: RequestContext, cancelled: bool = False) -> None:
        """End of the request's life, on every path (success, error, disconnect): runs
        the completion hooks and releases the admission slot and in-flight counts once."""
        if ctx.completed:
            return
        ctx.completed = True
        if ctx.trace is not None:
            ctx.trace.end(ctx, cancelled)
        r = ctx.request
        try:
            if ctx.targets and r is not None:
                if ctx.charge is not None:
                    ctx.charge.release()
                info = ctx.response
                if ctx.usage is not None:
                    ctx.usage.fill(info)
                info.end_of_stream = True
                self._record_response(ctx)
                self._hook(self.plugins.response_complete, ctx, info)
        finally:
            release, ctx.release = ctx.release, None
            if release is not None:
                release()

    @staticmethod
    def _hook(hook: ResponseHook, ctx: RequestContext, info: ResponseInfo) -> None:
        # A failing plugin must not break a response that is already streaming to the client.
        try:
            hook(ctx.request, info, ctx.targets[0])
        except Exception:  # noqa: BLE001
            log.exception("request_id=%s: response hook failed", ctx.request_id)

    def _record_response(self, ctx: RequestContext) -> None:
        series = ctx.series
        if series is None:
            return
        series.running.dec()
        info = ctx.response
        if not info.status:  # client went away before the response
            return
        now = self.clock()
        # The reference holds an unstreamed body until its end: its response time runs from
        # the headers to then; a stream's is the picker's own time on each piece.
        picker_time = ctx.response_time if ctx.streaming else now - ctx.response_headers_at
        if picker_time > 0:
            self.telemetry.response_processing.observe(picker_time)
        duration = now - ctx.start
        self.telemetry.response_done(
            series, status=info.status, duration=duration, response_bytes=ctx.response_bytes,
            prompt_tokens=info.prompt_tokens, cached_tokens=info.cached_tokens,
            completion_tokens=info.completion_tokens,
            ttft=ctx.first_chunk_at - ctx.start if ctx.first_chunk_at else None, streaming=ctx.streaming)

    # ------------------------------------------------------------------ explain (project API)
    def explain(self, headers: Mapping[str, str], body: bytes) -> ExplainResult:
        """What the picker would do with this request (parse, rewrite, objective, one
        scheduling cycle with a trace) without side effects on the pool or the plugins."""
        ctx = self.new_context({k.lower(): v for k, v in headers.items()}, traced=False)
        request = self.prepare(ctx, body)
        candidates = self.reachable(self.datastore.endpoints())
        trace = SchedulingTrace()
        try:
            cycle, result = self.plugins.run_cycle(request, candidates, trace=trace, commit=False)
        except InferenceError as err:  # keep the trace: it shows which filter emptied the set
            return ExplainResult(request=request, candidates=[e.name for e in candidates], trace=trace,
                                 error_code=err.code, error_message=err.message)
        return ExplainResult(request=request, candidates=[e.name for e in candidates], trace=trace,
                             primary_profile=result.primary_profile, targets=[e.name for e in result.targets],
                             headers=dict(result.headers),
                             prefix_matches={k.partition("/")[2]: v for k, v in cycle.items()
                                             if isinstance(v, PrefixCacheMatchInfo)},
                             latency_predictions={k.partition("/")[2]: v for k, v in cycle.items()
                                                  if isinstance(v, LatencyPredictions)})

