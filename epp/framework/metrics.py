"""How a plugin registers its own Prometheus metrics: through `PluginHandle.metrics`.

The server hands plugins its registry, so their metrics appear on /metrics beside the
picker's; by default (tests, benchmarks) each handle has a private registry. Metrics are
shared by name: instances asking for the same histogram get the same one, and gauges of
one name are summed, so the exposition holds one family per name whatever the config.

Recording is cheap (the hot path): a histogram observation adds to plain Python numbers,
turned into a metric family only when the registry is collected (a scrape)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_INF = float("inf")


class HistogramRecorder(Collector):
    """A histogram with Prometheus's bucket rule (the first bucket whose upper bound is
    >= the value; a NaN counts in no bucket, only in the sum and count)."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        self.name, self.doc = name, doc
        self._bounds = (*sorted(buckets), _INF)
        self._counts = [0] * len(self._bounds)
        self._nan = 0
        self._sum = 0.0

    def observe(self, value: float) -> None:
        if value == value:
            self._counts[bisect_left(self._bounds, value)] += 1
        else:
            self._nan += 1
        self._sum += value

    def collect(self) -> Iterable[Metric]:
        running, buckets = 0, []
        for bound, n in zip(self._bounds, self._counts, strict=True):
            running += n
            buckets.append((floatToGoString(bound), running))
        buckets[-1] = ("+Inf", running + self._nan)
        return [HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self._sum)]


class _SummedGauge(Collector):
    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.reads: list[Callable[[], float]] = []

    def collect(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, self.doc, value=sum(read() for read in self.reads))]


class PluginMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._histograms: dict[str, HistogramRecorder] = {}
        self._gauges: dict[str, _SummedGauge] = {}

    def histogram(self, name: str, doc: str, buckets: Sequence[float]) -> HistogramRecorder:
        h = self._histograms.get(name)
        if h is None:
            h = self._histograms[name] = HistogramRecorder(name, doc, buckets)
            self.registry.register(h)
        return h

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped; several readers of one name are summed."""
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = _SummedGauge(name, doc)
            self.registry.register(g)
        g.reads.append(read)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)
