"""The picker's own Prometheus metrics, named and labelled exactly as the reference's
(reference operations.md), so existing dashboards and alerts keep working.

Hot-path recording goes through cached label children (a dict lookup, no `.labels()`
call per request) that only add to plain Python numbers; those are folded into the
prometheus_client metrics when the registry is collected (a scrape), so a request takes
no lock and walks no bucket list, and the exposition is prometheus_client's own. Pool
gauges are computed at scrape time from the datastore by a custom collector, so the hot
path never touches them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from epp.datalayer.datastore import Datastore

_LATENCY = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45,
            60, 120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144, 524288, 1048576,
          2097152, 4194304, 8388608, 16777216, 33554432, 67108864, 134217728, 268435456, 536870912, 1073741824)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32778, 65536, 131072, 262144,
           524288, 1048576)
_TPOT = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6,
         0.8, 1, 1.5, 2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 120, 180, 240, 300, 360, 480, 600, 900, 1200,
         1800, 2700, 3600)
_SCHEDULER = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
_PLUGIN = (0.00001, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)

MODEL_LABELS = ("model_name", "target_model_name")
# Model-labelled histograms of a request's life: attribute, name, help, buckets.
_REQUEST_HISTOGRAMS = (
    ("request_duration", "inference_objective_request_duration_seconds",
     "Inference objective response latency distribution in seconds.", _LATENCY),
    ("request_sizes", "inference_objective_request_sizes",
     "Inference objective requests size distribution in bytes.", _SIZES),
    ("response_sizes", "inference_objective_response_sizes",
     "Inference objective responses size distribution in bytes.", _SIZES),
    ("input_tokens", "inference_objective_input_tokens", "Inference objective input token count distribution.",
     _TOKENS),
    ("output_tokens", "inference_objective_output_tokens", "Inference objective output token count distribution.",
     _TOKENS),
    ("cached_tokens", "inference_objective_prompt_cached_tokens",
     "Inference objective prompt cached token count distribution.", _TOKENS),
    ("ntpot", "inference_objective_normalized_time_per_output_token_seconds",
     "Inference objective latency divided by number of output tokens.", _TPOT),
    ("ttft", "inference_objective_request_ttft_seconds", "Inference objective time to first token in seconds.",
     _LATENCY),
    ("tpot", "inference_objective_request_tpot_seconds", "Inference objective time per output token in seconds.",
     _TPOT),
)

# Distinct model names that get their own label value, besides the ones the pool knows
# (`--metrics-max-model-labels`); every other name is counted under OVERFLOW_MODEL_LABEL,
# as the reference picker does, so made-up names in request bodies cannot grow /metrics.
# Each label value costs about 32 KB of /metrics (and its memory): 100 -> ~3 MB at most.
DEFAULT_MAX_MODEL_LABELS = 100
OVERFLOW_MODEL_LABEL = "other"
MAX_MODEL_LABEL_CHARS = 256  # a longer model name is counted under OVERFLOW_MODEL_LABEL, never printed
KNOWN_MODELS_REFRESH = 1.0  # seconds between re-reads of the models the pool knows


def pool_models(datastore: Datastore) -> set[str]:
    """Model names the pool knows: rewrite sources and targets, objective names, and the
    LoRA adapters endpoints report running or waiting."""
    known: set[str] = set(datastore.objectives)
    for rewrite in datastore.rewrites():
        for rule in rewrite.rules:
            known.update(rule.matches)
            known.update(t.model_rewrite for t in rule.targets)
    for e in datastore.endpoints():
        known |= e.metrics.running_lora_adapters
        known |= e.metrics.waiting_lora_adapters
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
        self._labelled: set[str] = set()  # first-come names, at most `limit`
        self._pinned: set[str] = set()  # known names, at most `limit`
        self._known: frozenset[str] = frozenset()
        self._known_at = -KNOWN_MODELS_REFRESH

    def __call__(self, model: str) -> str:
        if not model or model in self._labelled or model in self._pinned:
            return model
        if len(model) > MAX_MODEL_LABEL_CHARS:
            return OVERFLOW_MODEL_LABEL
        if model in self._known_models() and len(self._pinned) < self.limit:
            self._pinned.add(model)
            return model
        if len(self._labelled) < self.limit:
            self._labelled.add(model)
            return model
        return OVERFLOW_MODEL_LABEL

    def _known_models(self) -> frozenset[str]:
        now = self._clock()
        if now - self._known_at >= KNOWN_MODELS_REFRESH:
            self._known, self._known_at = frozenset(self.known()), now
        return self._known

    def __len__(self) -> int:
        return len(self._labelled) + len(self._pinned)


class PoolCollector(Collector):
    """inference_pool_* gauges computed from the datastore when scraped."""

    def __init__(self, datastore: Datastore, pool_name: str, staleness: float) -> None:
        self._ds = datastore
        self._pool = pool_name
        self._staleness = staleness

    def collect(self) -> Iterable[GaugeMetricFamily]:
        now = time.monotonic()
        eps = self._ds.endpoints()
        fresh = [e for e in eps if e.metrics.ok and e.metrics.age(now) <= self._staleness]
        n = len(fresh)
        kv = GaugeMetricFamily("inference_pool_average_kv_cache_utilization",
                               "The average kv cache utilization for an inference server pool.", labels=["name"])
        queue = GaugeMetricFamily("inference_pool_average_queue_size",
                                  "The average number of requests pending in the model server queue.",
                                  labels=["name"])
        running = GaugeMetricFamily("inference_pool_average_running_requests",
                                    "The average number of running requests across the pool.", labels=["name"])
        ready = GaugeMetricFamily("inference_pool_ready_pods", "The number of ready pods in the inference pool.",
                                  labels=["name"])
        per_pod = GaugeMetricFamily("inference_pool_per_pod_queue_size",
                                    "The total number of requests pending in the model server queue for each "
                                    "underlying pod.", labels=["name", "model_server_pod"])
        if n:
            kv.add_metric([self._pool], sum(e.metrics.kv_cache_usage_percent for e in fresh) / n)
            queue.add_metric([self._pool], sum(e.metrics.waiting_queue_size for e in fresh) / n)
            running.add_metric([self._pool], sum(e.metrics.running_requests_size for e in fresh) / n)
        ready.add_metric([self._pool], len(eps))
        for e in fresh:
            per_pod.add_metric([self._pool, e.pod_name], e.metrics.waiting_queue_size)
        return [kv, queue, running, ready, per_pod]


class _PickerCollector(Collector):
    def __init__(self, admission: Any) -> None:
        self._admission = admission

    def collect(self) -> Iterable[GaugeMetricFamily]:
        size = GaugeMetricFamily("inference_extension_flow_control_queue_size",
                                 "Requests currently queued by flow control.", labels=["priority"])
        qbytes = GaugeMetricFamily("inference_extension_flow_control_queue_bytes",
                                   "Bytes currently queued by flow control.", labels=["priority"])
        stats = getattr(self._admission, "band_stats", None)
        for priority, (count, nbytes) in sorted((stats() if stats else {}).items()):
            size.add_metric([str(priority)], count)
            qbytes.add_metric([str(priority)], nbytes)
        saturation = GaugeMetricFamily("inference_extension_flow_control_pool_saturation",
                                       "Pool saturation last seen by admission.",
                                       value=float(getattr(self._admission, "last_saturation", 0.0)))
        return [size, qbytes, saturation]


class _PendingHistogram:
    """Observations of one histogram child, held until the next collection. Same bucket
    rule as prometheus_client: the first bucket whose upper bound is >= the value (a NaN
    goes into no bucket but into the sum)."""

    __slots__ = ("_child", "_bounds", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds = tuple(child._upper_bounds)
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
        child = self._child
        child._sum.inc(total)
        for value, n in zip(child._buckets, counts, strict=True):
            if n:
                value.inc(n)


class _PendingCounter:
    __slots__ = ("_child", "_n")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._n = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as prometheus_client
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._n += amount

    def flush(self) -> None:
        if self._n:
            n, self._n = self._n, 0
            self._child.inc(n)


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

    def wrap(self, child: Any, kind: str) -> Any:
        pending = _PENDING[kind](child)
        self.pending.append(pending)
        return pending


class _Children:
    """Label children cached by label values: one dict lookup on the hot path."""

    __slots__ = ("_metric", "_cache", "_flusher")

    def __init__(self, metric: Any, flusher: _Flusher) -> None:
        self._metric = metric
        self._cache: dict[tuple, Any] = {}
        self._flusher = flusher

    def get(self, *labels: Any) -> Any:
        child = self._cache.get(labels)
        if child is None:
            metric = self._metric
            child = self._cache[labels] = self._flusher.wrap(metric.labels(*[str(v) for v in labels]),
                                                             metric._type)
        return child


class Telemetry:
    # model-labelled histograms set from _REQUEST_HISTOGRAMS
    request_duration: _Children
    request_sizes: _Children
    response_sizes: _Children
    input_tokens: _Children
    output_tokens: _Children
    cached_tokens: _Children
    ntpot: _Children
    ttft: _Children
    tpot: _Children

    def __init__(self, registry: CollectorRegistry | None = None, *, commit: str = "", build_ref: str = "",
                 max_model_labels: int = DEFAULT_MAX_MODEL_LABELS) -> None:
        # Every model label value goes through this bound (the director applies it once per request).
        self.model_labels = ModelLabels(max_model_labels)
        r = self.registry = registry if registry is not None else CollectorRegistry()
        flusher = self._flusher = _Flusher()
        r.register(flusher)  # first: collection order is registration order

        def hist(name: str, doc: str, buckets: tuple, labels: tuple = MODEL_LABELS) -> _Children:
            return _Children(Histogram(name, doc, labels, buckets=buckets, registry=r), flusher)

        self.request_total = _Children(Counter(
            "inference_objective_request_total", "Counter of inference objective requests broken out for each "
            "model and target model.", [*MODEL_LABELS, "priority"], registry=r), flusher)
        self.request_error_total = _Children(Counter(
            "inference_objective_request_error_total", "Counter of inference objective requests errors broken out "
            "for each model and target model.", [*MODEL_LABELS, "error_code"], registry=r), flusher)
        for attr, name, doc, buckets in _REQUEST_HISTOGRAMS:
            setattr(self, attr, hist(name, doc, buckets))
        self.running_requests = _Children(Gauge(
            "inference_objective_running_requests", "Inference objective number of running requests in each "
            "model.", ["model_name"], registry=r), flusher)
        self.scheduler_e2e = flusher.wrap(Histogram(
            "inference_extension_scheduler_e2e_duration_seconds", "Scheduling latency distribution in seconds.",
            buckets=_SCHEDULER, registry=r), "histogram")
        self.scheduler_attempts = _Children(Counter(
            "inference_extension_scheduler_attempts_total", "Number of scheduling attempts.",
            ["status", "target_model_name"], registry=r), flusher)
        self.plugin_duration = _Children(Histogram(
            "inference_extension_plugin_duration_seconds", "Plugin processing latency distribution in seconds.",
            ["extension_point", "plugin_type", "plugin_name"], buckets=_PLUGIN, registry=r), flusher)
        self.model_rewrite_decisions = _Children(Counter(
            "inference_extension_model_rewrite_decisions_total", "Number of model rewrite decisions.",
            ["model_rewrite_name", "model_name", "target_model"], registry=r), flusher)
        self.flow_control_queue_duration = _Children(Histogram(
            "inference_extension_flow_control_request_queue_duration_seconds",
            "Time a request spent in the flow-control queue.", ["fairness_id", "priority", "outcome"],
            buckets=_LATENCY, registry=r), flusher)
        info = Gauge("inference_extension_info", "General information of the current build.",
                     ["commit", "build_ref"], registry=r)
        info.labels(commit or "unknown", build_ref or "unknown").set(1)

    # ------------------------------------------------------------------ hooks
    def add_pool_collector(self, datastore: Datastore, pool_name: str, staleness: float) -> None:
        self.registry.register(PoolCollector(datastore, pool_name, staleness))

    def add_picker_collector(self, admission: Any) -> None:
        """Flow-control queue gauges, read when scraped (plugins register their own metrics)."""
        self.registry.register(_PickerCollector(admission))

    def plugin_observer(self) -> Callable[[str, str, str, float], None]:
        """The pipeline's observe(extension_point, plugin_type, plugin_name, seconds) callback."""
        children = self.plugin_duration
        cache: dict[tuple[str, str, str], Any] = {}  # the pending child's bound observe, per label set

        def observe(point: str, plugin_type: str, plugin_name: str, seconds: float) -> None:
            key = (point, plugin_type, plugin_name)
            fn = cache.get(key)
            if fn is None:
                fn = cache[key] = children.get(*key).observe
            fn(seconds)

        return observe

    def scheduled(self, target_model: str, seconds: float, ok: bool) -> None:
        self.scheduler_e2e.observe(seconds)
        self.scheduler_attempts.get("success" if ok else "failure", target_model).inc()

    def request_error(self, model: str, target_model: str, code: str) -> None:
        self.request_error_total.get(model, target_model, code).inc()
