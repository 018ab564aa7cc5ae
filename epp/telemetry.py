"""The picker's own Prometheus metrics, named, labelled and bucketed as the reference's:
the current `llm_d_epp_*` families beside the legacy `inference_objective_*`,
`inference_pool_*` and `inference_extension_*` ones that autoscalers and dashboards of the
GIE v1.5 generation read (llm-d/llm-d-router pkg/epp/metrics; the facts are checked in as
tests/fixtures/reference/metrics.txt).

Hot-path recording goes through cached per-request-series objects whose fields only add
to plain Python numbers; those are folded into the prometheus_client metrics when the
registry is collected (a scrape), so a request takes no lock and walks no bucket list, and
the exposition is prometheus_client's own. A legacy family and its llm_d_epp_* twin with
the same buckets share one pending record (one observation, two children at the scrape).
Pool and flow-control gauges are computed at scrape time by custom collectors.

Not registered here (their data comes with other issues, and an always-zero family would
lie): plugin_data_scope_violations (no data-scope enforcement), flow_control
global_capacity_utilization_requests (a global maxRequests, issue 11), P/D, precise-prefix and predicted-latency
families (issues 11-13; those are plugin metrics anyway). The legacy
inference_objective_request_ttft_seconds / _tpot_seconds are predicted-latency plugin
metrics in both generations (v1.5 registered them in its core, but only that plugin
recorded them), so they come with issue 13. Plugins register their own families through
the handle: flow_control_stale_endpoints (utilization-detector), prefix_indexer_* (the
approx prefix producer). The flow_control revocation* / reclaim* families are
epp.flowcontrol.eviction's (in-flight eviction).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.datalayer.datastore import Datastore
from epp.framework.metrics import OVERFLOW_LABEL, BoundedLabels

# Buckets, as the reference's (pkg/epp/metrics/metrics.go and llm_d_router_metrics.go).
LATENCY = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45,
           60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
TTFT = LATENCY[:LATENCY.index(120) + 1]  # llm_d_epp_request_ttft_seconds stops at 120 s
REQUEST_SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288,
                 1048576, 2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456,
                 536870912, 1073741824)
RESPONSE_SIZES = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536)
TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144,
          524288, 1048576)
OUTPUT_TOKENS = TOKENS[:TOKENS.index(8192) + 1]
NTPOT = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
STREAMING_TPOT = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5,
                  0.6, 0.8, 1, 2)
STREAMING_ITL = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2)
SCHEDULER = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
PLUGIN = SCHEDULER
REQUEST_PROCESSING = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
RESPONSE_PROCESSING = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                       5)
QUEUE_DURATION = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0)
FLOW_CONTROL_FAST = SCHEDULER  # dispatch cycle and enqueue durations
STREAM_DURATION = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)

MODEL_LABELS = ("model_name", "target_model_name")
REQUEST_LABELS = (*MODEL_LABELS, "fairness_id", "priority")  # the llm_d_epp_request_* families

# Flow-control outcomes as the reference names them (pkg/epp/flowcontrol/types/outcomes.go),
# from the queue's own words.
QUEUE_OUTCOMES = {"dispatched": "Dispatched", "rejected_ttl": "EvictedTTL", "cancelled": "EvictedContextCancelled",
                  "rejected_capacity": "RejectedCapacity", "rejected_other": "RejectedOther"}
SCHEDULER_SUCCESS, SCHEDULER_FAILURE = "success", "failure"
# Extension points whose label value the reference has renamed since v1.5.
EXTENSION_POINT_LABELS = {"PrepareData": "DataProducer"}
MODEL_SERVER_ERROR = "ModelServerError"  # the error code of a response whose status is not 200
DEFAULT_POOL_LABEL = "static"
METRICS_SOURCE_TYPE = "metrics-data-source"  # the reference's source type names, as label values
METRICS_EXTRACTOR_TYPE = "core-metrics-extractor"

# Distinct model names that get their own label value, besides the ones the pool knows
# (`--metrics-max-model-labels`); every other name is counted under OVERFLOW_MODEL_LABEL,
# as the reference picker does, so made-up names in request bodies cannot grow /metrics.
# Each label value costs about 45 KB of /metrics and ~0.14 MiB of picker memory (legacy and
# llm_d_epp_* families together): 32 -> ~1.4 MB of /metrics at most. Pools serve few names
# beyond the ones they know (those always keep their label), so 32 leaves room for those.
DEFAULT_MAX_MODEL_LABELS = 32
OVERFLOW_MODEL_LABEL = OVERFLOW_LABEL
MAX_MODEL_LABEL_CHARS = 256  # a longer model name is counted under OVERFLOW_MODEL_LABEL, never printed
KNOWN_MODELS_REFRESH = 1.0  # seconds between re-reads of the models the pool knows


def pool_models(datastore: Datastore) -> set[str]:
    """Model names the pool knows: rewrite sources and targets, objective names, the
    LoRA adapters endpoints report running or waiting, and the models they list."""
    known: set[str] = set(datastore.objectives)
    for rewrite in datastore.rewrites():
        for rule in rewrite.rules:
            known.update(rule.matches)
            known.update(t.model_rewrite for t in rule.targets)
    for e in datastore.endpoints():
        known |= e.metrics.running_lora_adapters
        known |= e.metrics.waiting_lora_adapters
        known |= e.served.names()  # /v1/models (models-data-source): base models and adapters
    return known


class ModelLabels:
    """Bounds the model label values of the request metrics. A name the pool knows keeps
    its own label (up to `limit` such names); other names get their own label first come,
    up to `limit`, then OVERFLOW_MODEL_LABEL, as does any name over MAX_MODEL_LABEL_CHARS. A name once labelled keeps its label, so a
    gauge's inc and dec always meet the same child."""

    __slots__ = ("limit", "known", "_clock", "_labelled", "_pinned", "_known", "_known_at")

    def __init__(self, limit: int = DEFAULT_MAX_MODEL_LABELS, known: Callable[[], Iterable[str]] = tuple,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.known = known  # the pool's models; read at most every KNOWN_MODELS_REFRESH seconds
        self._clock = clock
        self._labelled = BoundedLabels(limit, OVERFLOW_MODEL_LABEL)  # first-come names
        self._pinned = BoundedLabels(limit, OVERFLOW_MODEL_LABEL)  # known names
        self._known: frozenset[str] = frozenset()
        self._known_at = -KNOWN_MODELS_REFRESH

    def __call__(self, model: str) -> str:
        if not model or model in self._labelled or model in self._pinned:
            return model
        if len(model) > MAX_MODEL_LABEL_CHARS:
            return OVERFLOW_MODEL_LABEL
        if model in self._known_models() and self._pinned.admit(model):
            return model
        return self._labelled(model)

    def _known_models(self) -> frozenset[str]:
        now = self._clock()
        if now - self._known_at >= KNOWN_MODELS_REFRESH:
            self._known, self._known_at = frozenset(self.known()), now
        return self._known

    def __len__(self) -> int:
        return len(self._labelled) + len(self._pinned)


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (the reference's std_dev gauges)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n)


class PoolCollector(Collector):
    """The pool gauges (legacy inference_pool_* and llm_d_epp_*), computed from the
    datastore when scraped."""

    def __init__(self, datastore: Datastore, pool_name: str, staleness: float) -> None:
        self._ds = datastore
        self._pool = pool_name
        self._staleness = staleness

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = time.monotonic()
        eps = self._ds.endpoints()
        fresh = [e for e in eps if e.metrics.ok and e.metrics.age(now) <= self._staleness]
        pool = [self._pool]
        out: list[GaugeMetricFamily] = []

        def gauge(name: str, doc: str, value: float | None, labels: tuple[str, ...] = ("name",)) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            if value is not None:
                g.add_metric(pool, value)
            out.append(g)
            return g

        stats: dict[str, tuple[float, float] | None] = {"kv": None, "queue": None, "running": None}
        if fresh:
            stats["kv"] = _spread([e.metrics.kv_cache_usage_percent for e in fresh])
            stats["queue"] = _spread([float(e.metrics.waiting_queue_size) for e in fresh])
            stats["running"] = _spread([float(e.metrics.running_requests_size) for e in fresh])
        for key, what in (("kv", "kv_cache_utilization"), ("queue", "queue_size"),
                          ("running", "running_requests")):
            s = stats[key]
            words = what.replace("_", " ")
            gauge(f"inference_pool_average_{what}", f"The average {words} across the pool.", s and s[0])
            gauge(f"llm_d_epp_average_{what}", f"The average {words} across the pool.", s and s[0])
            gauge(f"llm_d_epp_std_dev_{what}", f"The standard deviation of {words} across the pool.", s and s[1])
        gauge("inference_pool_ready_pods", "The number of ready pods in the inference pool.", len(eps))
        gauge("llm_d_epp_ready_endpoints", "The number of ready endpoints in the inference pool.", len(eps))
        per_pod = gauge("inference_pool_per_pod_queue_size", "The total number of requests pending in the model "
                        "server queue for each underlying pod.", None, ("name", "model_server_pod"))
        per_ep = gauge("llm_d_epp_per_endpoint_queue_size", "The total number of requests pending in the model "
                       "server queue for each endpoint.", None, ("name", "model_server_endpoint"))
        for e in fresh:  # both labelled with the endpoint's name (<pod>-rank-<i>), as the reference
            per_pod.add_metric([self._pool, e.name], e.metrics.waiting_queue_size)
            per_ep.add_metric([self._pool, e.name], e.metrics.waiting_queue_size)
        return out


class FlowControlCollector(Collector):
    """Flow-control gauges read when scraped: what is queued, per flow and model (legacy and
    llm_d_epp_*), the saturation admission last saw, and (flow control on) each band's fill."""

    def __init__(self, admission: Any, pool_name: str, bound: Callable[[str], str]) -> None:
        self._admission = admission
        self._pool = pool_name
        self._bound = bound  # the model-label bound of the request metrics

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["fairness_id", "priority", "inference_pool", *MODEL_LABELS]
        fams = {name: GaugeMetricFamily(name, doc, labels=labels) for name, doc in (
            ("inference_extension_flow_control_queue_size", "Requests currently queued by flow control."),
            ("llm_d_epp_flow_control_queue_size", "Requests currently queued by flow control."),
            ("inference_extension_flow_control_queue_bytes", "Bytes currently queued by flow control."),
            ("llm_d_epp_flow_control_queue_bytes", "Bytes currently queued by flow control."))}
        queues = getattr(self._admission, "queues", None)
        held: dict[tuple[str, str, str, str, str], list[int]] = {}
        band_fill: list[tuple[str, float, float]] = []
        total_bytes = 0
        if queues is not None:
            bound = self._bound
            for priority, band in sorted(queues.bands.items()):
                for fairness_id, waiters in band.flows.items():
                    for w in waiters:
                        key = (fairness_id, str(priority), self._pool, bound(w.request.incoming_model),
                               bound(w.request.target_model))
                        slot = held.setdefault(key, [0, 0])
                        slot[0] += 1
                        slot[1] += w.size
                cfg = band.config
                band_fill.append((str(priority), band.count / cfg.max_requests if cfg.max_requests else 0.0,
                                  band.bytes / cfg.max_bytes if cfg.max_bytes else 0.0))
                total_bytes += band.bytes
        for key, (count, nbytes) in held.items():
            for name in ("inference_extension_flow_control_queue_size", "llm_d_epp_flow_control_queue_size"):
                fams[name].add_metric(list(key), count)
            for name in ("inference_extension_flow_control_queue_bytes", "llm_d_epp_flow_control_queue_bytes"):
                fams[name].add_metric(list(key), nbytes)
        out = list(fams.values())
        sat = float(getattr(self._admission, "last_saturation", 0.0))
        for name in ("inference_extension_flow_control_pool_saturation", "llm_d_epp_flow_control_pool_saturation"):
            g = GaugeMetricFamily(name, "Pool saturation last seen by admission, per stage.",
                                  labels=["inference_pool", "stage"])
            g.add_metric([self._pool, "effective"], sat)
            out.append(g)
        by_requests = GaugeMetricFamily("llm_d_epp_flow_control_capacity_utilization_requests",
                                        "Queued requests over the band's maxRequests (0 when unlimited).",
                                        labels=["priority", "inference_pool"])
        by_bytes = GaugeMetricFamily("llm_d_epp_flow_control_capacity_utilization_bytes",
                                     "Queued bytes over the band's maxBytes (0 when unlimited).",
                                     labels=["priority", "inference_pool"])
        global_bytes = GaugeMetricFamily("llm_d_epp_flow_control_global_capacity_utilization_bytes",
                                         "Queued bytes over the flow-control maxBytes (0 when unlimited).",
                                         labels=["inference_pool"])
        for priority, requests_ratio, bytes_ratio in band_fill:
            by_requests.add_metric([priority, self._pool], requests_ratio)
            by_bytes.add_metric([priority, self._pool], bytes_ratio)
        if queues is not None:  # flow control on; without it the families are empty, as the reference's
            limit = queues.config.max_bytes
            global_bytes.add_metric([self._pool], total_bytes / limit if limit else 0.0)
        out += [by_requests, by_bytes, global_bytes]
        return out


class _PendingHistogram:
    """Observations of one or more histogram children with the same buckets, held until
    the next collection. Same bucket rule as prometheus_client: the first bucket whose
    upper bound is >= the value (a NaN goes into no bucket but into the sum)."""

    __slots__ = ("_children", "_bounds", "_counts", "_sum")

    def __init__(self, *children: Any) -> None:
        self._children = children
        self._bounds = tuple(children[0]._upper_bounds)
        if any(tuple(c._upper_bounds) != self._bounds for c in children):
            raise ValueError("a pending histogram feeds only children with the same buckets")
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        if amount == amount:
            self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        counts, total = self._counts, self._sum
        if total == 0 and not any(counts):
            return
        self._counts, self._sum = [0] * len(counts), 0.0
        for child in self._children:
            child._sum.inc(total)
            for value, n in zip(child._buckets, counts, strict=True):
                if n:
                    value.inc(n)


class _PendingCounter:
    __slots__ = ("_children", "_n")

    def __init__(self, *children: Any) -> None:
        self._children = children
        self._n = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as prometheus_client
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._n += amount

    def flush(self) -> None:
        if self._n:
            n, self._n = self._n, 0
            for child in self._children:
                child.inc(n)


class _PendingGauge(_PendingCounter):
    """A gauge's pending delta, which may go either way."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        self._n += amount

    def dec(self, amount: float = 1) -> None:
        self._n -= amount


_PENDING: dict[str, Any] = {"histogram": _PendingHistogram, "counter": _PendingCounter, "gauge": _PendingGauge}


class _Flusher(Collector):
    """Registered before the picker's metrics, so a collection folds everything pending
    into them before they are read. Exports nothing itself."""

    def __init__(self) -> None:
        self.pending: list[Any] = []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for p in self.pending:
            p.flush()
        return []

    def wrap(self, kind: str, *children: Any) -> Any:
        pending = _PENDING[kind](*children)
        self.pending.append(pending)
        return pending


class _Children:
    """Label children of one or more families with the same kind and buckets, cached by
    label values: one dict lookup on the hot path. Each further family takes the label
    values its `pick` selects (e.g. the legacy twin without fairness_id)."""

    __slots__ = ("_metrics", "_cache", "_flusher")

    def __init__(self, flusher: _Flusher, metric: Any,
                 *twins: tuple[Any, Callable[[tuple], tuple]]) -> None:
        self._metrics = ((metric, None), *twins)
        self._cache: dict[tuple, Any] = {}
        self._flusher = flusher

    def get(self, *labels: Any) -> Any:
        child = self._cache.get(labels)
        if child is None:
            values = tuple(str(v) for v in labels)
            prom = [m.labels(*(values if pick is None else pick(values))) for m, pick in self._metrics]
            child = self._cache[labels] = self._flusher.wrap(self._metrics[0][0]._type, *prom)
        return child


class RequestSeries:
    """The request metrics of one (model, target model, fairness id, priority): each field
    is a pending recorder, made on first use (so a series shows only what happened to it,
    as the reference's WithLabelValues does)."""

    __slots__ = ("_tel", "_key", "total", "size", "response_size", "duration", "input_tokens", "output_tokens",
                 "cached_tokens", "running", "ntpot", "ttft_streaming", "ttft_unary", "streaming_tpot",
                 "itl")

    def __init__(self, tel: Telemetry, key: tuple[str, str, str, str]) -> None:
        self._tel = tel
        self._key = key

    def __getattr__(self, name: str) -> Any:  # only reached while the slot is unset
        if name.startswith("_"):
            raise AttributeError(name)
        recorder = self._tel._series_recorder(name, self._key)
        setattr(self, name, recorder)
        return recorder

    def error(self, code: str) -> None:
        self._tel.request_error_total.get(*self._key, code).inc()

def _legacy_model(values: tuple) -> tuple:
    return values[:2]


def _same(values: tuple) -> tuple:
    return values


class Telemetry:
    """Every family of the picker's core. Recorders are `_Children` (label values ->
    pending recorder) or, for the per-request families, `RequestSeries` from `series()`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, commit: str = "", build_ref: str = "",
                 max_model_labels: int = DEFAULT_MAX_MODEL_LABELS, grpc_stream_metrics: bool = False) -> None:
        # Every model label value goes through this bound (the director applies it once per request);
        # fairness ids come from a client header, so they are bounded the same way.
        self.model_labels = ModelLabels(max_model_labels)
        self.fairness_labels = ModelLabels(max_model_labels)
        r = self.registry = registry if registry is not None else CollectorRegistry()
        flusher = self._flusher = _Flusher()
        r.register(flusher)  # first: collection order is registration order
        self._series: dict[tuple[str, str, str, str], RequestSeries] = {}  # bounded by the label bounds above

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(name, doc, list(labels), registry=r)

        def hist(name: str, doc: str, buckets: tuple, labels: Iterable[str] = ()) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets, registry=r)

        def children(metric: Any, *twins: tuple[Any, Callable[[tuple], tuple]]) -> _Children:
            return _Children(flusher, metric, *twins)

        legacy_total = counter("inference_objective_request_total", "Counter of inference objective requests "
                               "broken out for each model and target model.", [*MODEL_LABELS, "priority"])
        self.request_total = children(counter("llm_d_epp_request_total", "Counter of requests broken out for "
                                              "each model, target model, fairness id and priority.",
                                              REQUEST_LABELS), (legacy_total, lambda v: (v[0], v[1], v[3])))
        legacy_errors = counter("inference_objective_request_error_total", "Counter of inference objective "
                                "requests errors broken out for each model and target model.",
                                [*MODEL_LABELS, "error_code"])
        self.request_error_total = children(counter("llm_d_epp_request_error_total", "Counter of request errors "
                                                    "broken out for each model, target model, fairness id, "
                                                    "priority and error code.", [*REQUEST_LABELS, "error_code"]),
                                            (legacy_errors, lambda v: (v[0], v[1], v[4])))

        def twin_hists(new: str, legacy: str, what: str, buckets: tuple) -> _Children:
            return children(hist(new, f"{what} distribution.", buckets, REQUEST_LABELS),
                            (hist(legacy, f"Inference objective {what.lower()} distribution.", buckets, MODEL_LABELS),
                             _legacy_model))

        self.request_duration = twin_hists("llm_d_epp_request_duration_seconds",
                                           "inference_objective_request_duration_seconds",
                                           "Response latency in seconds", LATENCY)
        self.request_sizes = twin_hists("llm_d_epp_request_size_bytes", "inference_objective_request_sizes",
                                        "Request size in bytes", REQUEST_SIZES)
        self.response_sizes = twin_hists("llm_d_epp_response_size_bytes", "inference_objective_response_sizes",
                                         "Response size in bytes", RESPONSE_SIZES)
        self.input_tokens = twin_hists("llm_d_epp_request_input_tokens", "inference_objective_input_tokens",
                                       "Input token count", TOKENS)
        self.output_tokens = twin_hists("llm_d_epp_request_output_tokens", "inference_objective_output_tokens",
                                        "Output token count", OUTPUT_TOKENS)
        self.cached_tokens = twin_hists("llm_d_epp_request_cached_tokens", "inference_objective_prompt_cached_tokens",
                                        "Prompt cached token count", TOKENS)
        self.ntpot = twin_hists("llm_d_epp_request_ntpot_seconds",
                                "inference_objective_normalized_time_per_output_token_seconds",
                                "Latency divided by output tokens", NTPOT)
        self.running_requests = children(
            Gauge("llm_d_epp_request_running", "Number of running requests per model, target model, fairness id "
                  "and priority.", list(REQUEST_LABELS), registry=r),
            (Gauge("inference_objective_running_requests", "Inference objective number of running requests in "
                   "each model.", ["model_name"], registry=r), lambda v: v[:1]))
        self.request_ttft = children(hist("llm_d_epp_request_ttft_seconds", "Time to first response byte in "
                                          "seconds (the whole duration when not streaming).", TTFT,
                                          [*REQUEST_LABELS, "streaming"]))
        self.streaming_tpot = children(hist("llm_d_epp_request_streaming_tpot_seconds", "Streaming responses: "
                                            "time per output token after the first, in seconds.", STREAMING_TPOT,
                                            REQUEST_LABELS))
        self.streaming_itl = children(hist("llm_d_epp_request_streaming_itl_seconds", "Streaming responses: time "
                                           "between successive response body chunks, in seconds.", STREAMING_ITL,
                                           REQUEST_LABELS))
        self.scheduler_e2e = flusher.wrap("histogram", hist("llm_d_epp_scheduler_e2e_duration_seconds",
                                                            "Scheduling latency distribution in seconds.", SCHEDULER),
                                          hist("inference_extension_scheduler_e2e_duration_seconds",
                                               "Scheduling latency distribution in seconds.", SCHEDULER))
        self.scheduler_attempts = children(
            counter("llm_d_epp_scheduler_attempts_total", "Number of scheduling attempts, by outcome and chosen "
                    "endpoint.", ["status", "target_model_name", "endpoint_name", "namespace", "port"]),
            (counter("inference_extension_scheduler_attempts_total", "Number of scheduling attempts.",
                     ["status", "target_model_name", "pod_name", "namespace", "port"]), _same))
        plugin_labels = ["extension_point", "plugin_type", "plugin_name"]
        self.plugin_duration = children(
            hist("llm_d_epp_plugin_duration_seconds", "Plugin processing latency distribution in seconds.", PLUGIN,
                 plugin_labels),
            (hist("inference_extension_plugin_duration_seconds", "Plugin processing latency distribution in "
                  "seconds.", PLUGIN, plugin_labels), _same))
        self.request_processing = flusher.wrap("histogram", hist(
            "llm_d_epp_request_processing_duration_seconds", "Picker time on a request's request path (receipt to "
            "routing decision or rejection), in seconds.", REQUEST_PROCESSING))
        self.response_processing = flusher.wrap("histogram", hist(
            "llm_d_epp_response_processing_duration_seconds", "Picker time on a request's response path, in "
            "seconds.", RESPONSE_PROCESSING))
        rewrite_labels = ["model_rewrite_name", "model_name", "target_model"]
        self.model_rewrite_decisions = children(
            counter("llm_d_epp_model_rewrite_decisions_total", "Number of model rewrite decisions.", rewrite_labels),
            (counter("inference_extension_model_rewrite_decisions_total", "Number of model rewrite decisions.",
                     rewrite_labels), _same))
        queue_labels = ["fairness_id", "priority", "outcome", "inference_pool", *MODEL_LABELS]
        self.flow_control_queue_duration = children(
            hist("llm_d_epp_flow_control_request_queue_duration_seconds", "Time a request spent in flow control, "
                 "by outcome.", QUEUE_DURATION, queue_labels),
            (hist("inference_extension_flow_control_request_queue_duration_seconds", "Time a request spent in "
                  "flow control, by outcome.", QUEUE_DURATION, queue_labels), _same))
        self.flow_control_dispatch_cycle = flusher.wrap(
            "histogram", hist("llm_d_epp_flow_control_dispatch_cycle_duration_seconds", "Time of one flow-control "
                              "dispatch cycle.", FLOW_CONTROL_FAST),
            hist("inference_extension_flow_control_dispatch_cycle_duration_seconds", "Time of one flow-control "
                 "dispatch cycle.", FLOW_CONTROL_FAST))
        enqueue_labels = ["fairness_id", "priority", "outcome"]
        self.flow_control_enqueue_duration = children(
            hist("llm_d_epp_flow_control_request_enqueue_duration_seconds", "Time to enqueue a request into flow "
                 "control.", FLOW_CONTROL_FAST, enqueue_labels),
            (hist("inference_extension_flow_control_request_enqueue_duration_seconds", "Time to enqueue a request "
                  "into flow control.", FLOW_CONTROL_FAST, enqueue_labels), _same))
        self.flow_control_requests = children(counter(
            "llm_d_epp_flow_control_requests_total", "Requests that went through flow control, by final outcome.",
            ["outcome", "priority", "inference_pool"]))
        self.datalayer_poll_errors = children(
            counter("llm_d_epp_datalayer_poll_errors_total", "Failed data-source polls, by source type.",
                    ["source_type"]),
            (counter("llm_d_inference_scheduler_datalayer_poll_errors_total", "Failed data-source polls, by source "
                     "type.", ["source_type"]), _same))
        extract_labels = ["source_type", "extractor_type"]
        self.datalayer_extract_errors = children(
            counter("llm_d_epp_datalayer_extract_errors_total", "Failed extractions, by source and extractor type.",
                    extract_labels),
            (counter("llm_d_inference_scheduler_datalayer_extract_errors_total", "Failed extractions, by source and "
                     "extractor type.", extract_labels), _same))
        for name in ("llm_d_epp_info", "inference_extension_info"):
            Gauge(name, "General information of the current build.", ["commit", "build_ref"],
                  registry=r).labels(commit or "unknown", build_ref or "unknown").set(1)
        self.grpc_stream_metrics = grpc_stream_metrics
        if grpc_stream_metrics:  # --enable-grpc-stream-metrics
            self.streams_inflight = flusher.wrap("gauge", Gauge(
                "llm_d_epp_extproc_streams_inflight", "Open ext_proc streams.", registry=r))
            self.stream_duration = flusher.wrap("histogram", hist(
                "llm_d_epp_extproc_stream_duration_seconds", "Lifetime of an ext_proc stream in seconds.",
                STREAM_DURATION))
            self.streams_total = children(counter("llm_d_epp_extproc_streams_total", "Finished ext_proc streams, "
                                                  "by gRPC status code.", ["code"]))
        self.pool_name = DEFAULT_POOL_LABEL
        # RequestSeries field -> (recorder, label values after the series key or a cut of it)
        self._series_fields: dict[str, tuple[_Children, Callable[[tuple], tuple]]] = {
            "total": (self.request_total, _same), "size": (self.request_sizes, _same),
            "response_size": (self.response_sizes, _same), "duration": (self.request_duration, _same),
            "input_tokens": (self.input_tokens, _same), "output_tokens": (self.output_tokens, _same),
            "cached_tokens": (self.cached_tokens, _same), "running": (self.running_requests, _same),
            "ntpot": (self.ntpot, _same), "ttft_streaming": (self.request_ttft, lambda k: (*k, "true")),
            "ttft_unary": (self.request_ttft, lambda k: (*k, "false")),
            "streaming_tpot": (self.streaming_tpot, _same),
            "itl": (self.streaming_itl, _same),
        }

    # ------------------------------------------------------------------ per request
    def series(self, model: str, target_model: str, fairness_id: str, priority: int) -> RequestSeries:
        """The request recorders of one label set; `model`/`target_model` already bounded
        by model_labels, the fairness id is bounded here."""
        key = (model, target_model, self.fairness_labels(fairness_id), str(priority))
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = RequestSeries(self, key)
        return s

    def _series_recorder(self, name: str, key: tuple[str, str, str, str]) -> Any:
        spec = self._series_fields.get(name)
        if spec is None:
            raise AttributeError(name)
        recorder, labels = spec
        return recorder.get(*labels(key))

    @staticmethod
    def response_done(s: RequestSeries, *, status: int, duration: float, response_bytes: int, prompt_tokens: int,
                      cached_tokens: int, completion_tokens: int, ttft: float | None, streaming: bool) -> None:
        """A response ended (the reference's end-of-stream recording): latency, sizes,
        usage tokens, ttft (+ streaming label), streaming tpot, ntpot; an error if the
        model server's status was not 200."""
        s.duration.observe(duration)
        s.response_size.observe(response_bytes)
        if status != 200:
            s.error(MODEL_SERVER_ERROR)
        if prompt_tokens > 0:
            s.input_tokens.observe(prompt_tokens)
        if cached_tokens:
            s.cached_tokens.observe(cached_tokens)
        out = completion_tokens
        if out > 0:
            s.output_tokens.observe(out)
            if duration > 0:
                s.ntpot.observe(duration / out)
        if ttft is not None and ttft > 0:  # a body arrived
            if not streaming:  # the reference reads an unstreamed body whole: its first token is at its end
                s.ttft_unary.observe(duration)
            else:
                s.ttft_streaming.observe(ttft)
                if out > 1 and duration > ttft:
                    s.streaming_tpot.observe((duration - ttft) / (out - 1))

    # ------------------------------------------------------------------ hooks
    def add_pool_collector(self, datastore: Datastore, pool_name: str, staleness: float) -> None:
        self.pool_name = pool_name
        self.registry.register(PoolCollector(datastore, pool_name, staleness))

    def add_picker_collector(self, admission: Any) -> None:
        """Flow-control gauges, read when scraped (plugins register their own metrics)."""
        self.registry.register(FlowControlCollector(admission, self.pool_name, self.model_labels))

    def plugin_observer(self) -> Callable[[str, str, str, float], None]:
        """The pipeline's observe(extension_point, plugin_type, plugin_name, seconds) callback."""
        children = self.plugin_duration
        cache: dict[tuple[str, str, str], Any] = {}  # the pending child's bound observe, per label set

        def recorder(point: str, plugin_type: str, plugin_name: str) -> Callable[[float], None]:
            key = (point, plugin_type, plugin_name)
            fn = cache.get(key)
            if fn is None:
                fn = cache[key] = children.get(EXTENSION_POINT_LABELS.get(point, point), plugin_type,
                                               plugin_name).observe
            return fn

        def observe(point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
            fn = cache.get((point, plugin_type, plugin_name))
            (fn or recorder(point, plugin_type, plugin_name))(seconds)

        def bind(point: str, plugin_type: str, plugin_name: str) -> Callable[[], Callable[[float], None]]:
            return partial(recorder, point, plugin_type, plugin_name)  # epp.timing resolves at the first call

        observe.bind = bind  # type: ignore[attr-defined]
        return observe

    def scheduled(self, target_model: str, seconds: float, endpoint: Any = None, ok: bool = True) -> None:
        """One scheduling cycle: its duration and the attempt, labelled with the primary
        endpoint on success (empty endpoint labels on failure, as the reference)."""
        self.scheduler_e2e.observe(seconds)
        if ok and endpoint is not None:
            self.scheduler_attempts.get(SCHEDULER_SUCCESS, target_model, endpoint.pod_name or endpoint.name,
                                        endpoint.namespace, endpoint.port).inc()
        else:
            self.scheduler_attempts.get(SCHEDULER_SUCCESS if ok else SCHEDULER_FAILURE, target_model, "", "",
                                        "").inc()

    def request_error(self, model: str, target_model: str, code: str, fairness_id: str = "",
                      priority: int = 0) -> None:
        self.series(model, target_model, fairness_id, priority).error(code)

    def flow_control_observer(self) -> Callable[[Any, str, float], None]:
        """Admission's observe(request, event, seconds) callback for flow control: event
        "enqueued" (seconds = time to enqueue), or a final outcome of QUEUE_OUTCOMES
        (seconds = time since enqueue; 0 for a request dispatched without queueing)."""
        queued, enqueue, requests = (self.flow_control_queue_duration, self.flow_control_enqueue_duration,
                                     self.flow_control_requests)
        models, fairness_labels = self.model_labels, self.fairness_labels

        def observe(request: Any, event: str, seconds: float) -> None:
            priority, fairness = request.priority, fairness_labels(request.fairness_id)
            if event == "enqueued":  # queued, not final: the reference's NotYetFinalized
                enqueue.get(fairness, priority, "NotYetFinalized").observe(seconds)
                return
            outcome = QUEUE_OUTCOMES.get(event, event)
            if event == "rejected_capacity":
                enqueue.get(fairness, priority, outcome).observe(seconds)
            queued.get(fairness, priority, outcome, self.pool_name, models(request.incoming_model),
                       models(request.target_model)).observe(seconds)
            requests.get(outcome, priority, self.pool_name).inc()

        return observe

    def datalayer_error(self, kind: str, source_type: str = METRICS_SOURCE_TYPE,
                        extractor_type: str = METRICS_EXTRACTOR_TYPE) -> None:
        """The data layer's error hook: kind "poll" (the fetch failed) or "extract" (the
        answer could not be used), with the source's and extractor's plugin types."""
        if kind == "poll":
            self.poll_error(source_type)
        else:
            self.extract_error(source_type, extractor_type)

    def poll_error(self, source_type: str = METRICS_SOURCE_TYPE) -> None:
        self.datalayer_poll_errors.get(source_type).inc()

    def extract_error(self, source_type: str = METRICS_SOURCE_TYPE,
                      extractor_type: str = METRICS_EXTRACTOR_TYPE) -> None:
        self.datalayer_extract_errors.get(source_type, extractor_type).inc()

    def stream_opened(self) -> None:
        if self.grpc_stream_metrics:
            self.streams_inflight.inc()

    def stream_closed(self, code: str, seconds: float) -> None:
        if self.grpc_stream_metrics:
            self.streams_inflight.dec()
            self.stream_duration.observe(seconds)
            self.streams_total.get(code).inc()
