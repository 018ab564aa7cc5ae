"""The reference predictor sidecars' JSON shapes (GIE v1.5 sidecars/latencypredictorasync/
types.go; llm-d-router latencypredictorclient/types.go), to and from LatencyFeatures, so a
client of those sidecars and this in-process model share one feature type. No I/O here.

Naming gap: the reference fills input_token_length with the prompt's whitespace word count;
LatencyFeatures.input_tokens is whatever count the caller has (tokens when known)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .features import LatencyFeatures, clean
from .model import MAX_LATENCY_MS, LatencyPrediction

POD_TYPES = ("", "prefill", "decode")   # the reference's pod_type values ("" = monolithic)

# JSON key -> LatencyFeatures field.
_KEYS = {
    "kv_cache_percentage": "kv_cache_usage", "num_request_waiting": "waiting_requests",
    "num_request_running": "running_requests", "input_token_length": "input_tokens",
    "prefix_cache_score": "prefix_match", "prefill_tokens_in_flight": "prefill_tokens_in_flight",
    "decode_tokens_in_flight": "decode_tokens_in_flight", "num_tokens_generated": "tokens_generated",
}
_INTEGER_KEYS = frozenset(_KEYS) - {"kv_cache_percentage", "prefix_cache_score"}


def prediction_request(f: LatencyFeatures, pod_type: str = "") -> dict[str, Any]:
    """One PredictionRequest (POST /predict, or an item of /predict/bulk{,/strict} "requests");
    ValueError for features `clean` rejects."""
    if clean(f) is None:
        raise ValueError(f"features out of range: {f!r}")
    out: dict[str, Any] = {key: (round(getattr(f, field)) if key in _INTEGER_KEYS else float(getattr(f, field)))
                           for key, field in _KEYS.items()}
    if pod_type:
        out["pod_type"] = pod_type
    return out


def training_entry(f: LatencyFeatures, *, ttft_ms: float, tpot_ms: float, timestamp: datetime,
                   pod_type: str = "") -> dict[str, Any]:
    """One TrainingEntry (an item of POST /add_training_data_bulk {"entries": [...]}); a target
    not measured is 0, as the reference sends it."""
    out = prediction_request(f, pod_type)
    out["actual_ttft_ms"], out["actual_tpot_ms"] = float(ttft_ms), float(tpot_ms)
    out["timestamp"] = timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return out


def features_from_json(obj: object) -> LatencyFeatures | None:
    """LatencyFeatures from a PredictionRequest or TrainingEntry object; None when it is not
    an object, a value is missing-typed, or out of range (absent keys are 0, as in Go)."""
    if not isinstance(obj, Mapping):
        return None
    values = {}
    for key, field in _KEYS.items():
        v = obj.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        values[field] = v
    return clean(LatencyFeatures(**values))


def prediction_from_json(obj: object) -> LatencyPrediction | None:
    """The ttft_ms and tpot_ms of a PredictionResponse; None unless both are finite, >= 0."""
    if not isinstance(obj, Mapping):
        return None
    out = []
    for key in ("ttft_ms", "tpot_ms"):
        v = obj.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= MAX_LATENCY_MS \
                or math.isnan(v):
            return None
        out.append(float(v))
    return LatencyPrediction(out[0], out[1])
