"""The project's own gRPC API (proto/epp_api.proto, service epp.api.v1.EndpointPicker).

`ListEndpoints` reads the datastore; `Explain` calls the director's side-effect-free
explain and converts its ExplainResult (epp.requestcontrol.explain) to the
wire message. Both are async handlers for the picker's grpc.aio server.
"""

from __future__ import annotations

import bisect
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import grpc

from epp.datalayer.datastore import Datastore
from epp.errors import HTTP_STATUS, InferenceError
from epp.framework import Endpoint, InferenceRequest
from epp.framework.datakeys import LatencyPredictionInfo, PrefixCacheMatchInfo
from epp.requestcontrol.explain import ExplainResult
from proto import epp_api_pb2 as pb
from proto import epp_api_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from epp.scheduling.scheduler import ProfileTrace

log = logging.getLogger("epp.handlers.api")


ExplainFn = Callable[[Mapping[str, str], bytes], "ExplainResult | Awaitable[ExplainResult]"]
StatusFn = Callable[[Endpoint], Mapping[str, str]]  # what plugins report about an endpoint


class ApiServicer(pb_grpc.EndpointPickerServicer):
    def __init__(self, datastore: Datastore, explain: ExplainFn, clock: Callable[[], float] = time.monotonic,
                 endpoint_status: StatusFn | None = None) -> None:
        self.datastore = datastore
        self.explain = explain
        self.clock = clock  # the clock the scraper stamps Metrics.update_time with
        self.endpoint_status = endpoint_status  # what plugins report per endpoint (EndpointInfo.status)

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ListEndpointsResponse:
        return list_endpoints(self.datastore.endpoints(), self.datastore.synced, self.clock(),
                              request.page_size, request.page_token, self.endpoint_status)

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
        return fit_explain(self.explain_response(result))

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
            error_message=_cut(result.error_message, MAX_MESSAGE_CHARS),
            http_status=HTTP_STATUS.get(result.error_code, 500) if result.error_code else 0,
        )
        if result.request is not None:
            out.request.CopyFrom(parsed_request(result.request))
            out.slo_ttft_ms, out.slo_tpot_ms = result.request.slo_ttft_ms, result.request.slo_tpot_ms
        if result.trace is not None:
            out.profiles.extend(profile_trace(p) for p in result.trace.profiles)
        for producer, info in sorted(result.prefix_matches.items()):
            out.prefix_matches.extend(prefix_match(producer, ep, n, info)
                                      for ep, n in sorted(info.matches.items(), key=lambda kv: kv[0].name))
        for producer, latency in sorted(result.latency_predictions.items()):
            out.latency_predictions.extend(latency_prediction(producer, ep, i) for ep, i in
                                           sorted(latency.endpoints.items(), key=lambda kv: kv[0].name))
        return out


def add_api_servicer(server: grpc.aio.Server | grpc.Server, servicer: ApiServicer) -> None:
    pb_grpc.add_EndpointPickerServicer_to_server(servicer, server)


# ---------------------------------------------------------------------------- bounds
# Every response stays well under a gRPC client's default 4 MiB receive limit, however
# many endpoints the pool has and whatever a model server or an endpoints file put in
# their labels: lists are paged, long values cut.
MAX_RESPONSE_BYTES = 1 << 20
MAX_PAGE_SIZE = 500  # endpoints per ListEndpoints page
MAX_VALUE_CHARS = 256  # label values, adapter names, model names in a response
MAX_LABELS = 64  # labels shown per endpoint
MAX_ADAPTERS = 64  # adapter names shown per list
MAX_MESSAGE_CHARS = 4096  # an explain error message
_CUT_STEPS = (256, 64, 16, 4, 1)  # explain: per-endpoint list lengths tried until the response fits


def _cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def list_endpoints(endpoints: Sequence[Endpoint], synced: bool, now: float, page_size: int = 0,
                   page_token: str = "", status: StatusFn | None = None) -> pb.ListEndpointsResponse:
    """One page of `endpoints` (sorted by name, as the datastore keeps them): those after
    `page_token` (the last name of the previous page), at most `page_size` and
    MAX_RESPONSE_BYTES of them."""
    limit = min(page_size, MAX_PAGE_SIZE) if page_size > 0 else MAX_PAGE_SIZE
    start = bisect.bisect_right(endpoints, page_token, key=lambda e: e.name) if page_token else 0
    out = pb.ListEndpointsResponse(synced=synced)
    size = 0
    for i in range(start, len(endpoints)):
        info = endpoint_info(endpoints[i], now)
        if status is not None:
            info.status.update({_cut(k): _cut(v) for k, v in list(status(endpoints[i]).items())[:MAX_LABELS]})
        grown = size + info.ByteSize() + 8  # + field tag and length
        if len(out.endpoints) == limit or (out.endpoints and grown > MAX_RESPONSE_BYTES):
            out.next_page_token = out.endpoints[-1].name
            break
        out.endpoints.append(info)
        size = grown
    return out


def fit_explain(out: pb.ExplainResponse) -> pb.ExplainResponse:
    """Cut the per-endpoint lists (candidates, kept, scores, totals) until the response fits
    MAX_RESPONSE_BYTES; the picks and targets are always kept whole."""
    if out.ByteSize() <= MAX_RESPONSE_BYTES:
        return out
    for keep in _CUT_STEPS:
        del out.candidates[keep:]
        del out.prefix_matches[keep:]
        del out.latency_predictions[keep:]
        for p in out.profiles:
            del p.candidates[keep:]
            del p.totals[keep:]
            for f in p.filters:
                del f.kept[keep:]
            for s in p.scorers:
                del s.scores[keep:]
        if out.ByteSize() <= MAX_RESPONSE_BYTES:
            break
    out.truncated = True
    return out


# ---------------------------------------------------------------------------- messages
def _adapters(names: frozenset[str]) -> tuple[list[str], bool]:
    shown = sorted(names)[:MAX_ADAPTERS]
    cut = [_cut(n) for n in shown]
    return cut, len(names) > MAX_ADAPTERS or cut != shown


def prefix_match(producer: str, ep: Endpoint, matched: int, info: PrefixCacheMatchInfo) -> pb.PrefixMatch:
    return pb.PrefixMatch(producer=_cut(producer), endpoint=ep.name, matched_blocks=matched,
                          total_blocks=info.total_blocks, block_size_tokens=info.block_size_tokens,
                          blocks_by_medium=info.by_medium.get(ep, {}))


def latency_prediction(producer: str, ep: Endpoint, i: LatencyPredictionInfo) -> pb.LatencyPrediction:
    return pb.LatencyPrediction(producer=_cut(producer), endpoint=ep.name, ttft_ms=i.ttft_ms, tpot_ms=i.tpot_ms,
                                ttft_headroom_ms=i.ttft_headroom_ms, tpot_headroom_ms=i.tpot_headroom_ms,
                                meets_slo=i.valid, dispatched_requests=i.dispatched_requests)


def endpoint_info(ep: Endpoint, now: float) -> pb.EndpointInfo:
    m = ep.metrics
    age = m.age(now)
    labels = {_cut(k): _cut(v) for k, v in sorted(ep.labels.items())[:MAX_LABELS]}
    running, running_cut = _adapters(m.running_lora_adapters)
    waiting, waiting_cut = _adapters(m.waiting_lora_adapters)
    truncated = (len(ep.labels) > MAX_LABELS or running_cut or waiting_cut
                 or any(len(k) > MAX_VALUE_CHARS or len(v) > MAX_VALUE_CHARS for k, v in ep.labels.items()))
    return pb.EndpointInfo(
        name=ep.name,
        address=ep.address,
        port=ep.port,
        labels=labels,
        namespace=_cut(ep.namespace),
        pod_name=_cut(ep.pod_name),
        truncated=truncated,
        metrics=pb.EndpointMetrics(
            waiting_queue_size=m.waiting_queue_size,
            running_requests_size=m.running_requests_size,
            kv_cache_usage=m.kv_cache_usage_percent,
            running_lora_adapters=running,
            waiting_lora_adapters=waiting,
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
    return pb.ParsedRequest(incoming_model=_cut(r.incoming_model), target_model=_cut(r.target_model), kind=r.kind,
                            objective=_cut(r.objective), priority=r.priority, stream=r.stream,
                            prompt_chars=len(r.prompt_text))


def _scores(scores: Mapping[str, float], order: Sequence[str]) -> list[pb.EndpointScore]:
    known = set(order)
    names = [n for n in order if n in scores] + [n for n in scores if n not in known]
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
