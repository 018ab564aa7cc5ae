"""inflight-load-producer (the reference's requestcontrol/dataproducer/inflightload/producer.go,
token_estimator.go): counts, per endpoint, the requests this picker routed there and the
tokens they still cost, and publishes them with each request's own cost there
(InFlightLoadInfo under INFLIGHT_LOAD.of(<its name>)) for token-load-scorer,
active-request-scorer and prefix-cache-affinity-filter.

A request's cost on an endpoint is its uncached prompt tokens: (total - matched prefix
blocks) x block size from the prefix match (prefixMatchInfoProducerName), plus the prompt
beyond the indexed blocks; without a match, the whole prompt (token-producer's count).
With addEstimatedOutputTokens, round(prompt x outputRatio) is added, capped by the
request's max tokens and maxEstimatedOutputTokens.

PreRequest charges each profile's primary target. On the first response chunk the prompt
is done: without output estimates the tokens are released (the prefill profile's request
too); with them only the prefill profile's charge. The rest goes at the end of the stream
or on completion (always called, also when the client went away), exactly once.

syncCrossReplicaState: as in the reference it matters only with a cross-replica syncer
(dataLayer.crossReplicaSyncerPluginRef), which the config loader refuses; without one the
load is this replica's, as the reference's is."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ResponseInfo,
    SchedulingResult,
    bounded,
)
from epp.framework.datakeys import (
    APPROX_PREFIX_PRODUCER,
    INFLIGHT_LOAD,
    PREFIX_MATCH_INFO,
    PREFIX_MATCH_PRODUCER,
    TOKENIZED_PROMPT,
    TOKENS_CONSUMER,
    DataKey,
    InFlightLoadInfo,
    PrefixCacheMatchInfo,
    ProducerParam,
)
from epp.framework.plugins import ConfiguredPlugin

log = logging.getLogger(__name__)
K = TypeVar("K")

DEFAULT_OUTPUT_RATIO = 1.5
PREFILL_PROFILE = "prefill"  # the reference's hard-coded prefill profile name
# Requests tracked at once; past it the oldest is released (its completion was lost).
MAX_TRACKED_REQUESTS = 1 << 16
REQUESTS_FAMILY, TOKENS_FAMILY = "llm_d_epp_inflight_requests", "llm_d_epp_inflight_tokens"
_LABELS = ("endpoint_name", "namespace", "producer_name", "fairness_id", "priority")


@dataclass(slots=True)
class InFlightLoadParams:
    addEstimatedOutputTokens: bool = False
    outputRatio: float = bounded(DEFAULT_OUTPUT_RATIO, ge=0)
    maxEstimatedOutputTokens: int | None = bounded(None, ge=0)  # None: no cap
    prefixMatchInfoProducerName: str = APPROX_PREFIX_PRODUCER
    syncCrossReplicaState: bool = True


def estimate_output(input_tokens: int, ratio: float, max_tokens: int | None, cap: int | None) -> int:
    """round(input x ratio) (halves up), bounded by the client's max tokens and the operator's cap."""
    if input_tokens <= 0:
        return 0
    est = math.floor(input_tokens * ratio + 0.5)  # Go's math.Round: halves away from zero
    if max_tokens is not None and 0 <= max_tokens < est:
        est = max_tokens
    if cap is not None and 0 <= cap < est:
        est = cap
    return est


def uncached_input(info: PrefixCacheMatchInfo | None, endpoint: Endpoint, input_tokens: int) -> int:
    """The prompt tokens the endpoint must compute: the blocks it does not hold, plus the
    prompt beyond the indexed blocks (the reference's uncachedInputTokens)."""
    if info is None or info.block_size_tokens <= 0:
        return max(0, input_tokens)
    bs = info.block_size_tokens
    indexed = info.total_blocks * bs
    return max(0, indexed - info.matches.get(endpoint, 0) * bs) + max(0, input_tokens - indexed)


class _Charge:
    __slots__ = ("endpoint", "profile", "tokens", "requests", "labels")

    def __init__(self, endpoint: Endpoint, profile: str, tokens: int, labels: tuple[str, ...]) -> None:
        self.endpoint, self.profile, self.tokens, self.requests, self.labels = endpoint, profile, tokens, 1, labels


class _Gauges(Collector):
    """llm_d_epp_inflight_requests / _tokens; a series goes when it falls to 0, so there are
    never more series than tracked requests (MAX_TRACKED_REQUESTS)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, ...], int] = {}
        self.tokens: dict[tuple[str, ...], int] = {}

    def collect(self) -> Iterable[Metric]:
        out = []
        for name, doc, series in (
                (REQUESTS_FAMILY, "Requests counted in flight per endpoint by the in-flight load producer.",
                 self.requests),
                (TOKENS_FAMILY, "Tokens counted in flight per endpoint by the in-flight load producer.", self.tokens)):
            family = GaugeMetricFamily(name, doc, labels=list(_LABELS))
            for labels, v in series.items():
                family.add_metric(list(labels), v)
            out.append(family)
        return out


# One collector per metrics facility, shared by the producer instances that report to it.


class InFlightLoadProducer(ConfiguredPlugin[InFlightLoadParams]):
    type_name = "inflight-load-producer"
    Params = InFlightLoadParams
    consumes = (ProducerParam("prefixMatchInfoProducerName", APPROX_PREFIX_PRODUCER), TOKENS_CONSUMER)

    def configure(self, p: InFlightLoadParams, handle: PluginHandle) -> None:
        self.params = p
        self.key = INFLIGHT_LOAD.of(self.name)
        self._prefix_key = self.producer_key(PREFIX_MATCH_INFO, PREFIX_MATCH_PRODUCER)
        self._costs: DataKey[dict[Endpoint, int]] = self.own_key("costs", dict)
        self.requests: dict[Endpoint, int] = {}
        self.tokens: dict[Endpoint, int] = {}
        self._tracked: OrderedDict[str, list[_Charge]] = OrderedDict()  # request id -> its charges
        self._started: set[str] = set()  # requests whose first response chunk came
        self._gauges = handle.metrics.shared(_Gauges)

    # ------------------------------------------------------------------ costs
    def _input_tokens(self, cycle: CycleState) -> int:
        return cycle.read(TOKENIZED_PROMPT) or 0  # no token count: 0, as the reference

    def _cost(self, info: PrefixCacheMatchInfo | None, endpoint: Endpoint, input_tokens: int,
              request: InferenceRequest) -> int:
        tokens = uncached_input(info, endpoint, input_tokens)
        p = self.params
        if p.addEstimatedOutputTokens:  # output follows the whole prompt, not the uncached part
            tokens += estimate_output(input_tokens, p.outputRatio, request.max_tokens, p.maxEstimatedOutputTokens)
        return tokens

    # PrepareData
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        info = cycle.read(self._prefix_key)
        n = self._input_tokens(cycle)
        costs = {e: self._cost(info, e, n, request) for e in endpoints}
        cycle.write(self._costs, costs)
        # a snapshot: what the scheduler saw, also after this request is charged
        cycle.write(self.key, InFlightLoadInfo(dict(self.requests), dict(self.tokens), costs))

    # PreRequest
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        rid = request.request_id
        if not rid:
            return
        self._release_all(rid)  # a retried id must not count twice
        costs = cycle.read(self._costs) or {}
        info = cycle.read(self._prefix_key)
        n = self._input_tokens(cycle)
        charges = []
        for profile, r in result.profile_results.items():
            if r is None or not r.targets:
                continue
            ep = r.targets[0]  # the primary target, as the reference
            tokens = costs[ep] if ep in costs else self._cost(info, ep, n, request)
            labels = (ep.name, ep.namespace, self.name, request.fairness_id, str(request.priority))
            charge = _Charge(ep, profile, tokens, labels)
            self.requests[ep] = self.requests.get(ep, 0) + 1
            self.tokens[ep] = self.tokens.get(ep, 0) + tokens
            _add(self._gauges.requests, labels, 1)
            _add(self._gauges.tokens, labels, tokens)
            charges.append(charge)
        if not charges:
            return
        self._tracked[rid] = charges
        while len(self._tracked) > MAX_TRACKED_REQUESTS:
            oldest = next(iter(self._tracked))
            log.warning("%s: more than %d requests tracked, releasing the oldest (%s)", self.name,
                        MAX_TRACKED_REQUESTS, oldest)
            self._release_all(oldest)

    # ResponseStreaming: each body chunk
    def response_streaming(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        rid = request.request_id
        charges = self._tracked.get(rid)
        if charges is None:
            return
        if rid not in self._started:
            self._started.add(rid)
            for c in charges:  # the prompt has been computed
                if c.profile == PREFILL_PROFILE:
                    self._release(c, requests=True)
                elif not self.params.addEstimatedOutputTokens:
                    self._release(c, requests=False)
        if response.end_of_stream:
            self._release_all(rid)

    # ResponseComplete: always, once per routed request
    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        self._release_all(request.request_id)

    # EndpointsChanged
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            self.requests.pop(e, None)
            self.tokens.pop(e, None)

    # ------------------------------------------------------------------ release
    def _release(self, c: _Charge, *, requests: bool) -> None:
        if c.tokens:
            _add(self.tokens, c.endpoint, -c.tokens)
            _add(self._gauges.tokens, c.labels, -c.tokens)
            c.tokens = 0
        if requests and c.requests:
            _add(self.requests, c.endpoint, -c.requests)
            _add(self._gauges.requests, c.labels, -c.requests)
            c.requests = 0

    def _release_all(self, rid: str) -> None:
        charges = self._tracked.pop(rid, None)
        self._started.discard(rid)
        for c in charges or ():
            self._release(c, requests=True)


def _add(counts: dict[K, int], key: K, delta: int) -> None:
    """Add to a count; a count that falls to 0 (or below) goes, so none is ever left at 0."""
    v = counts.get(key, 0) + delta
    if v > 0:
        counts[key] = v
    else:
        counts.pop(key, None)
