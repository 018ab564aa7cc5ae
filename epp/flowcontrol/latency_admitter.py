"""latency-slo-admitter (the reference's requestcontrol/admitter/latencyslo): rejects a
sheddable request (priority < 0) that carries a latency SLO when no endpoint can meet it.

Admitted when any of: priority >= 0; no SLO header (x-llm-d-slo-ttft-ms / x-llm-d-slo-tpot-ms
or the older x-slo-*, > 0); no endpoint has a prediction (fail open); some endpoint's
prediction is valid (meets both SLOs); some endpoint runs no request (scraped running
requests 0: idle); some endpoint's KV cache is under 2 % (cold: predictions unreliable).
A denial is answered as the reference's director answers any Admit denial: 500 "request
cannot be admitted: no valid endpoint available to serve the request" (no dropped-reason
header: the reference sets one only for flow-control and no-endpoint rejections)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import LATENCY_PREDICTIONS, PREDICTED_LATENCY_CONSUMER, PredictionConsumerParams
from epp.framework.plugins import ConfiguredPlugin

COLD_KV_CACHE = 0.02
DENIED = "no valid endpoint available to serve the request"


class LatencySLOAdmitter(ConfiguredPlugin[PredictionConsumerParams]):
    type_name = "latency-slo-admitter"
    Params = PredictionConsumerParams
    consumes = (PREDICTED_LATENCY_CONSUMER,)

    def configure(self, p: PredictionConsumerParams, handle: PluginHandle) -> None:
        self._key = self.producer_key(LATENCY_PREDICTIONS, PREDICTED_LATENCY_CONSUMER)

    def admit_request(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> str | None:
        """None to admit, else the reason for denying."""
        if request.priority >= 0 or (request.slo_ttft_ms <= 0 and request.slo_tpot_ms <= 0):
            return None
        published = cycle.read(self._key)
        predictions = published.endpoints if published is not None else {}
        has_predictions = False
        for e in endpoints:
            m = e.metrics
            if m.kv_cache_usage_percent < COLD_KV_CACHE or m.running_requests_size == 0:
                return None  # a cold or idle endpoint can likely serve it
            info = predictions.get(e)
            if info is not None:
                has_predictions = True
                if info.valid:
                    return None
        return DENIED if has_predictions else None
