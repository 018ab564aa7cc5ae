"""The reference predictor sidecars' JSON shapes round-trip through LatencyFeatures."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from epp.requestcontrol.producers.latency import LatencyFeatures, LatencyPrediction
from epp.requestcontrol.producers.latency.sidecar_json import (
    features_from_json,
    prediction_from_json,
    prediction_request,
    training_entry,
)

F = LatencyFeatures(kv_cache_usage=0.42, waiting_requests=3, running_requests=17, input_tokens=1_200,
                    prefix_match=0.5, prefill_tokens_in_flight=4_000, decode_tokens_in_flight=90_000,
                    tokens_generated=0)


def test_prediction_request_has_the_reference_keys_and_types():
    req = prediction_request(F, pod_type="decode")
    assert req == {"kv_cache_percentage": 0.42, "num_request_waiting": 3, "num_request_running": 17,
                   "input_token_length": 1200, "prefix_cache_score": 0.5, "prefill_tokens_in_flight": 4000,
                   "decode_tokens_in_flight": 90000, "num_tokens_generated": 0, "pod_type": "decode"}
    assert all(type(req[k]) is int for k in ("num_request_waiting", "input_token_length",
                                             "decode_tokens_in_flight"))  # Go decodes these as int
    assert "pod_type" not in prediction_request(F)  # omitempty, as the reference


def test_training_entry_round_trips():
    ts = datetime(2026, 11, 29, 13, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    entry = json.loads(json.dumps(training_entry(F, ttft_ms=250.5, tpot_ms=0, timestamp=ts)))
    assert entry["actual_ttft_ms"] == 250.5 and entry["actual_tpot_ms"] == 0.0
    assert entry["timestamp"] == "2026-11-29T11:00:00.123456Z"  # RFC 3339 UTC, what Go's time.Time parses
    assert datetime.fromisoformat(entry["timestamp"]) == ts.astimezone(UTC)
    assert features_from_json(entry) == F


@pytest.mark.parametrize("bad", [
    None, [], "x", {"kv_cache_percentage": 1.5}, {"num_request_waiting": -1}, {"input_token_length": "12"},
    {"prefix_cache_score": math.nan}, {"num_request_running": True}, {"decode_tokens_in_flight": 1e30},
])
def test_hostile_json_gives_no_features(bad):
    assert features_from_json(bad) is None


def test_features_out_of_range_are_not_sent():
    with pytest.raises(ValueError, match="out of range"):
        prediction_request(LatencyFeatures(input_tokens=math.nan))


def test_absent_keys_are_zero_as_in_go():
    assert features_from_json({"input_token_length": 10}) == LatencyFeatures(input_tokens=10)


def test_prediction_response():
    assert prediction_from_json({"ttft_ms": 120.0, "tpot_ms": 14, "model_type": "xgboost"}) == \
        LatencyPrediction(120.0, 14.0)
    for bad in ({"ttft_ms": -1, "tpot_ms": 1}, {"ttft_ms": math.inf, "tpot_ms": 1}, {"ttft_ms": 1},
                {"ttft_ms": "1", "tpot_ms": 1}, [], None, {"ttft_ms": math.nan, "tpot_ms": 1}):
        assert prediction_from_json(bad) is None
