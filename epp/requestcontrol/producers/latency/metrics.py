"""The predicted-latency producer's metric families: the reference's (predictedlatency/
metrics.go: request and predicted TTFT/TPOT histograms, prediction durations, the latest value
per type as a gauge, SLO violations; each as the legacy inference_objective_* family and, where
the reference has one, the llm_d_epp_* family with plugin labels) and this model's own
prediction error per hardware class (llm_d_epp_latency_prediction_*).

One collector per metrics registry, shared by every producer instance of it, so two
producers never register a family twice. Label values are bounded: model names by the
producer (MAX_MODEL_LABELS), types by the table below, classes by the model (MAX_CLASSES)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from epp.framework.metrics import PluginMetrics

_LATENCY = (0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 45, 60,
            120, 180, 240, 300, 360, 480, 600, 900, 1200, 1800, 2700, 3600)
_TPOT = (0.0005, 0.00205, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1, 1.5,
         2, 3, 4.5, 6, 12, 18, 24, 30, 36, 48, 60, 90, 120, 180, 270, 360)
_DURATION = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# kind -> (buckets, has an llm_d_epp_request_<kind>_seconds family, what it measures)
HISTOGRAMS: dict[str, tuple[tuple[float, ...], bool, str]] = {
    "ttft": (_LATENCY, False, "TTFT distribution in seconds"),
    "predicted_ttft": (_LATENCY, True, "Predicted TTFT distribution in seconds"),
    "ttft_prediction_duration": (_DURATION, True, "Duration taken to generate TTFT predictions in seconds"),
    "tpot": (_TPOT, False, "TPOT distribution in seconds"),
    "predicted_tpot": (_TPOT, True, "Predicted TPOT distribution in seconds"),
    "tpot_prediction_duration": (_DURATION, True, "Duration taken to generate TPOT predictions in seconds"),
}
_SUFFIX = " for each model and target model."
ERROR_FAMILIES = {  # error row key -> (family, help)
    "mape": ("llm_d_epp_latency_prediction_mape", "Mean absolute percentage error (a fraction) of the in-process "
             "latency model's recent predictions, each scored before it was learnt."),
    "p90_abs_error_ms": ("llm_d_epp_latency_prediction_p90_abs_error_milliseconds", "90th percentile of the "
                         "absolute error of the latency model's recent predictions, in milliseconds."),
    "coverage": ("llm_d_epp_latency_prediction_coverage", "Fraction of recent actual latencies at or below the "
                 "prediction (the model predicts the 0.9 quantile)."),
    "trained": ("llm_d_epp_latency_prediction_training_samples", "Samples the latency model has learnt from."),
}



class _Shared(Collector):
    """The gauges and counters of every producer on one registry."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, ...], float] = {}      # (plugin, type, model, target, kind) -> value
        self.violations: dict[tuple[str, ...], int] = {}    # (plugin, type, model, target, kind) -> count
        self.error_rows: dict[str, Callable[[], list[dict[str, Any]]]] = {}  # plugin name -> its rows

    def collect(self) -> Iterable[Metric]:
        legacy = GaugeMetricFamily("inference_objective_inference_request_metric", "[Deprecated: Use "
                                   "llm_d_epp_inference_request_metric] Consolidated gauge for various inference "
                                   "request metrics including TTFT, TPOT, SLOs, and prediction durations.",
                                   labels=["model_name", "target_model_name", "type"])
        gauge = GaugeMetricFamily("llm_d_epp_inference_request_metric", "Consolidated gauge for various inference "
                                  "request metrics including TTFT, TPOT, SLOs, and prediction durations.",
                                  labels=["plugin_name", "plugin_type", "model_name", "target_model_name", "type"])
        for key, value in self.latest.items():
            legacy.add_metric(list(key[2:]), value)
            gauge.add_metric(list(key), value)
        old = CounterMetricFamily("inference_objective_request_slo_violation", "[Deprecated: Use "
                                  "llm_d_epp_request_slo_violation_total] Counter of SLO violations for each model, "
                                  "target model, and violation type.", labels=["model_name", "target_model_name", "type"])
        new = CounterMetricFamily("llm_d_epp_request_slo_violation", "Counter of SLO violations for each model, "
                                  "target model, and violation type.",
                                  labels=["plugin_name", "plugin_type", "model_name", "target_model_name", "type"])
        legacy_counts: dict[tuple[str, ...], int] = {}
        for key, n in self.violations.items():
            new.add_metric(list(key), n)
            legacy_counts[key[2:]] = legacy_counts.get(key[2:], 0) + n
        for key, n in legacy_counts.items():
            old.add_metric(list(key), n)
        errors = {k: GaugeMetricFamily(name, doc, labels=["plugin_name", "plugin_type", "endpoint_class", "target"])
                  for k, (name, doc) in ERROR_FAMILIES.items()}
        for plugin, rows in list(self.error_rows.items()):
            for row in rows():
                values = [plugin, "predicted-latency-producer", str(row["class"]), str(row["target"])]
                for key, fam in errors.items():
                    if key in row:
                        fam.add_metric(values, float(row[key]))
        return [legacy, gauge, old, new, *errors.values()]


class ProducerMetrics:
    """What one producer instance records."""

    def __init__(self, metrics: PluginMetrics, name: str, type_name: str,
                 error_rows: Callable[[], list[dict[str, Any]]]) -> None:
        shared = metrics.shared(_Shared)
        shared.error_rows[name] = error_rows
        self._shared, self._metrics, self._plugin = shared, metrics, (name, type_name)

    def observe(self, kind: str, model: str, target: str, seconds: float) -> None:
        """A histogram observation of `kind` (HISTOGRAMS), and the latest-value gauge."""
        buckets, llmd, what = HISTOGRAMS[kind]
        m = self._metrics
        m.histogram(f"inference_objective_request_{kind}_seconds", f"[Deprecated: Use llm_d_epp_request_{kind}_"
                    f"seconds] Inference model {what}{_SUFFIX}", buckets,
                    {"model_name": model, "target_model_name": target}).observe(seconds)
        if llmd:
            m.histogram(f"llm_d_epp_request_{kind}_seconds", f"Inference model {what}{_SUFFIX}", buckets,
                        {"plugin_name": self._plugin[0], "plugin_type": self._plugin[1], "model_name": model,
                         "target_model_name": target}).observe(seconds)
        self._shared.latest[(*self._plugin, model, target, kind)] = seconds

    def slo(self, kind: str, model: str, target: str, actual_ms: float, slo_ms: float) -> None:
        """`kind` (ttft or tpot) against its SLO: the <kind>_slo_violation gauge, and the counter."""
        violated = actual_ms > slo_ms
        key = (*self._plugin, model, target)
        self._shared.latest[(*key, f"{kind}_slo_violation")] = 1.0 if violated else 0.0
        if violated:
            self._shared.violations[(*key, kind)] = self._shared.violations.get((*key, kind), 0) + 1
