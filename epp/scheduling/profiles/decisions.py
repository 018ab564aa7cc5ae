"""The disaggregation decision counters of the reference's disagg handler (its
metrics.go): llm_d_epp_disagg_decision_total{plugin_name,plugin_type,model_name,decision_type}
and the deprecated llm_d_inference_scheduler_disagg_decision_total{model_name,decision_type},
one decision per scheduled request whose decode stage picked an endpoint."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, Metric

from epp.framework import PluginMetrics
from epp.framework.metrics import BoundedLabels

DECODE_ONLY, PREFILL_DECODE = "decode-only", "prefill-decode"
ENCODE_DECODE, ENCODE_PREFILL_DECODE = "encode-decode", "encode-prefill-decode"
FAMILY = "llm_d_epp_disagg_decision"
LEGACY_FAMILY = "llm_d_inference_scheduler_disagg_decision"
MAX_MODELS = 256  # distinct model_name values counted; later models count under "other"


def decision_type(encoded: bool, prefilled: bool) -> str:
    if encoded:
        return ENCODE_PREFILL_DECODE if prefilled else ENCODE_DECODE
    return PREFILL_DECODE if prefilled else DECODE_ONLY


class DecisionCounters:
    """One per metrics facility, shared by the handler instances reporting to it."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, str], int] = {}  # (name, type, model, decision) -> n
        self._models = BoundedLabels(MAX_MODELS)

    def record(self, plugin_name: str, plugin_type: str, model: str, decision: str) -> None:
        model = self._models(model or "unknown")
        key = (plugin_name, plugin_type, model, decision)
        self.counts[key] = self.counts.get(key, 0) + 1

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(FAMILY, "Total number of disaggregation routing decisions made",
                                     labels=["plugin_name", "plugin_type", "model_name", "decision_type"])
        legacy = CounterMetricFamily(LEGACY_FAMILY, "[Deprecated: Use llm_d_epp_disagg_decision_total] Total number "
                                     "of disaggregation routing decisions made", labels=["model_name", "decision_type"])
        by_model: dict[tuple[str, str], int] = {}
        for (name, ptype, model, decision), n in self.counts.items():
            family.add_metric([name, ptype, model, decision], n)
            by_model[(model, decision)] = by_model.get((model, decision), 0) + n
        for labels, n in by_model.items():
            legacy.add_metric(list(labels), n)
        return [family, legacy]




def decision_counters(metrics: PluginMetrics) -> DecisionCounters:
    return metrics.shared(DecisionCounters)
