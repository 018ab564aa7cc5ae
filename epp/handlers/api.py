"""The project's own gRPC API (proto/epp_api.proto, service epp.api.v1.EndpointPicker).

`ListEndpoints` reads the datastore; `Explain` calls the director's side-effect-free
explain and converts its ExplainResult (defined here; the director fills it) to the
wire message. Both are async handlers for the picker's grpc.aio server.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from epp.datalayer.datastore import Datastore
from epp.errors import HTTP_STATUS, InferenceError
from epp.framework import Endpoint, InferenceRequest
from proto import epp_api_pb2 as pb
from proto import epp_api_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from epp.scheduling.scheduler import ProfileTrace, SchedulingTrace

log = logging.getLogger("epp.handlers.api")


@dataclass(slots=True)
class ExplainResult:
    """What the director's explain returns. Endpoint references are endpoint names;
    "ip:port" strings are accepted too and shown as the endpoint's name."""

    request: InferenceRequest | None = None  # as parsed, after rewrite and objective lookup
    candidates: list[str] = field(default_factory=list)
    trace: SchedulingTrace | None = None
    primary_profile: str = ""
    targets: list[str] = field(default_factory=list)  # primary profile's picks, primary first
    headers: dict[str, str] = field(default_factory=dict)  # headers the picker would set upstream
    error_code: str = ""  # an epp.errors code when the request would fail
    error_message: str = ""


ExplainFn = Callable[[Mapping[str, str], bytes], "ExplainResult | Awaitable[ExplainResult]"]


class ApiServicer(pb_grpc.EndpointPickerServicer):
    def __init__(self, datastore: Datastore, explain: ExplainFn, clock: Callable[[], float] = time.monotonic) -> None:
        self.datastore = datastore
        self.explain = explain
        self.clock = clock  # the clock the scraper stamps Metrics.update_time with

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListEndpointsResponse:
        now = self.clock()
        return pb.ListEndpointsResponse(endpoints=[endpoint_info(e, now) for e in self.datastore.endpoints()],
                                        synced=self.datastore.synced)

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            result = self.explain(headers, bytes(request.body))
            if inspect.isawaitable(result):
                result = await result
        except InferenceError as e:
            result = ExplainResult(error_code=e.code, error_message=e.message)
        except Exception as e:  # a bug must not kill the server; the caller sees it
            log.exception("explain failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"explain failed: {type(e).__name__}: {e}")
        return self.explain_response(result)

    # ------------------------------------------------------------------ conversion
    def _name(self, ref: str) -> str:
        if self.datastore.get(ref) is not None:
            return ref
        ep = self.datastore.by_hostport(ref)
        return ep.name if ep is not None else ref

    def explain_response(self, result: ExplainResult) -> pb.ExplainResponse:
        out = pb.ExplainResponse(
            candidates=[self._name(c) for c in result.candidates],
            primary_profile=result.primary_profile or (result.trace.primary_profile if result.trace else ""),
            targets=[self._name(t) for t in result.targets],
            headers=result.headers,
            error_code=result.error_code,
            error_message=result.error_message,
            http_status=HTTP_STATUS.get(result.error_code, 500) if result.error_code else 0,
        )
        if result.request is not None:
            out.request.CopyFrom(parsed_request(result.request))
        if result.trace is not None:
            out.profiles.extend(profile_trace(p) for p in result.trace.profiles)
        return out


def add_api_servicer(server: grpc.aio.Server | grpc.Server, servicer: ApiServicer) -> None:
    pb_grpc.add_EndpointPickerServicer_to_server(servicer, server)


# ---------------------------------------------------------------------------- messages
def endpoint_info(ep: Endpoint, now: float) -> pb.EndpointInfo:
    m = ep.metrics
    age = m.age(now)
    return pb.EndpointInfo(
        name=ep.name,
        address=ep.address,
        port=ep.port,
        labels=dict(ep.labels),
        namespace=ep.namespace,
        pod_name=ep.pod_name,
        metrics=pb.EndpointMetrics(
            waiting_queue_size=m.waiting_queue_size,
            running_requests_size=m.running_requests_size,
            kv_cache_usage=m.kv_cache_usage_percent,
            running_lora_adapters=sorted(m.running_lora_adapters),
            waiting_lora_adapters=sorted(m.waiting_lora_adapters),
            max_lora=m.max_active_models,
            block_size=m.block_size or 0,
            num_gpu_blocks=m.num_gpu_blocks or 0,
            age_seconds=age if math.isfinite(age) else -1.0,
            ok=m.ok,
        ),
        in_flight_requests=ep.in_flight,
        in_flight_tokens=ep.in_flight_tokens,
    )


def parsed_request(r: InferenceRequest) -> pb.ParsedRequest:
    return pb.ParsedRequest(incoming_model=r.incoming_model, target_model=r.target_model, kind=r.kind,
                            objective=r.objective, priority=r.priority, stream=r.stream,
                            prompt_chars=len(r.prompt_text))


def _scores(scores: Mapping[str, float], order: Sequence[str]) -> list[pb.EndpointScore]:
    names = [n for n in order if n in scores] + [n for n in scores if n not in set(order)]
    return [pb.EndpointScore(endpoint=n, score=float(scores[n])) for n in names]


def profile_trace(p: ProfileTrace) -> pb.ProfileTrace:
    order = list(p.candidates)
    return pb.ProfileTrace(
        name=p.name,
        candidates=order,
        filters=[pb.FilterTrace(name=f.name, type=f.type, kept=list(f.kept)) for f in p.filters],
        scorers=[pb.ScorerTrace(name=s.name, type=s.type, weight=s.weight, scores=_scores(s.scores, order))
                 for s in p.scorers],
        totals=_scores(p.totals, order),
        picker=p.picker,
        picked=list(p.picked),
        error="filters left no endpoint" if p.failed else "",
    )
