"""How a plugin registers its own Prometheus metrics: through `PluginHandle.metrics`.

The server hands plugins its registry, so their metrics appear on /metrics beside the
picker's; by default (tests, benchmarks) each handle has a private registry. Metrics are
shared by name: instances asking for the same histogram get the same one, and gauges of
one name are summed, so the exposition holds one family per name whatever the config.

Recording is cheap (the hot path): a histogram observation adds to plain Python numbers,
turned into a metric family only when the registry is collected (a scrape)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

C = TypeVar("C", bound=Collector)

_INF = float("inf")
OVERFLOW_LABEL = "other"  # the label value of every name past a BoundedLabels' cap


class BoundedLabels:
    """A metric label whose values are capped: the first `limit` distinct values keep their
    own label (for good, so a gauge's inc and dec meet the same child), later ones get
    `overflow`, so made-up names (a request's model) cannot grow /metrics."""

    __slots__ = ("limit", "overflow", "_values")

    def __init__(self, limit: int, overflow: str = OVERFLOW_LABEL) -> None:
        self.limit = limit
        self.overflow = overflow
        self._values: set[str] = set()

    def admit(self, value: str) -> bool:
        """Whether `value` has (or now gets) its own label."""
        if value in self._values:
            return True
        if len(self._values) < self.limit:
            self._values.add(value)
            return True
        return False

    def __call__(self, value: str) -> str:
        return value if self.admit(value) else self.overflow

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def __len__(self) -> int:
        return len(self._values)


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

    def cumulative(self) -> list[tuple[str, float]]:
        running, buckets = 0, []
        for bound, n in zip(self._bounds, self._counts, strict=True):
            running += n
            buckets.append((floatToGoString(bound), running))
        buckets[-1] = ("+Inf", running + self._nan)
        return buckets

    def collect(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.doc, buckets=self.cumulative(), sum_value=self._sum)]


class _LabelledHistogram(Collector):
    """One histogram family whose series are told apart by labels (e.g. the plugin's
    name and type); one series per label set, so as many as configured plugin instances."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float], labelnames: tuple[str, ...]) -> None:
        self.name, self.doc, self.buckets, self.labelnames = name, doc, tuple(buckets), labelnames
        self.series: dict[tuple[str, ...], HistogramRecorder] = {}

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labelnames))
        for values, h in self.series.items():
            family.add_metric(list(values), h.cumulative(), h._sum)  # noqa: SLF001 - same module
        return [family]


class _SummedGauge(Collector):
    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.reads: list[Callable[[], float]] = []

    def collect(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(self.name, self.doc, value=sum(read() for read in self.reads))]


class _LabelledSummedGauge(Collector):
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.reads: dict[tuple[str, ...], list[Callable[[], float]]] = {}

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self.doc, labels=list(self.labelnames))
        for values, reads in self.reads.items():
            family.add_metric(list(values), sum(read() for read in reads))
        return [family]


class PluginMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._histograms: dict[str, HistogramRecorder] = {}
        self._gauges: dict[str, _SummedGauge] = {}
        self._labelled: dict[str, _LabelledHistogram | _LabelledSummedGauge] = {}
        self._shared: dict[type, Any] = {}

    def histogram(self, name: str, doc: str, buckets: Sequence[float],
                  labels: Mapping[str, str] | None = None) -> HistogramRecorder:
        """The histogram `name`, or with `labels` (e.g. plugin_name, plugin_type) its series
        for those label values; every user of a name must give the same label names."""
        if labels:
            family = self._family(name, _LabelledHistogram, doc, tuple(labels), buckets)
            values = tuple(labels.values())
            h = family.series.get(values)
            if h is None:
                h = family.series[values] = HistogramRecorder(name, doc, family.buckets)
            return h
        h = self._histograms.get(name)
        if h is None:
            h = self._histograms[name] = HistogramRecorder(name, doc, buckets)
            self.registry.register(h)
        return h

    def gauge(self, name: str, doc: str, read: Callable[[], float], labels: Mapping[str, str] | None = None) -> None:
        """A gauge read when scraped; several readers of one name (and label values) are summed."""
        if labels:
            family = self._family(name, _LabelledSummedGauge, doc, tuple(labels))
            family.reads.setdefault(tuple(labels.values()), []).append(read)
            return
        g = self._gauges.get(name)
        if g is None:
            g = self._gauges[name] = _SummedGauge(name, doc)
            self.registry.register(g)
        g.reads.append(read)

    def _family(self, name: str, kind: type, doc: str, labelnames: tuple[str, ...], *args: Any) -> Any:
        family = self._labelled.get(name)
        if family is None:
            family = self._labelled[name] = kind(name, doc, *args, labelnames) if args else kind(name, doc,
                                                                                                 labelnames)
            self.registry.register(family)
        elif not isinstance(family, kind) or family.labelnames != labelnames:
            raise ValueError(f"metric {name!r} is already registered with other labels or of another kind")
        return family

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def shared(self, kind: type[C]) -> C:
        """The one `kind()` collector of this facility, shared by every plugin instance that
        reports through it (e.g. summing over instances when scraped): made and registered at
        its first use."""
        found = self._shared.get(kind)
        if found is None:
            found = self._shared[kind] = kind()
            self.add_collector(found)
        return found
