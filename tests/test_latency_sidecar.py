"""The predictor-sidecar client: configured from the reference's environment variables, it
never makes the hot path wait (a slow or absent sidecar costs a request nothing), it uses the
prediction servers' answers once they arrive, and it ships training entries in the
reference's shape."""

from __future__ import annotations

import time

import pytest

from devstack.launch import free_ports, wait_until
from epp.requestcontrol.producers.latency import LatencyFeatures
from epp.requestcontrol.producers.latency.sidecar import (
    MAX_PREDICT_RESPONSE_BYTES,
    PREDICT_TIMEOUT_S,
    SidecarClient,
    SidecarConfig,
    cache_key,
)
from tests.latency_sidecars import FakeSidecars

F = LatencyFeatures(kv_cache_usage=0.31, waiting_requests=2, running_requests=3, input_tokens=900,
                    prefix_match=0.5, prefill_tokens_in_flight=1200)


def test_config_from_the_references_environment(monkeypatch):
    for name in ("TRAINING_SERVER_URL", "PREDICTION_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    assert SidecarConfig.from_env() is None  # no sidecars named: the in-process model alone
    monkeypatch.setenv("TRAINING_SERVER_URL", "http://localhost:8000")
    monkeypatch.setenv("PREDICTION_SERVER_URL", "http://localhost:8001,http://localhost:8002/, ftp://x")
    monkeypatch.setenv("LATENCY_MAX_SAMPLE_SIZE", "10000")
    monkeypatch.setenv("LATENCY_FLUSH_INTERVAL_SEC", "nan")  # hostile: the default
    monkeypatch.setenv("LATENCY_HTTP_TIMEOUT_SEC", "-3")
    c = SidecarConfig.from_env()
    assert c == SidecarConfig("http://localhost:8000", ("http://localhost:8001", "http://localhost:8002"),
                              max_sample_size=10000, flush_interval_s=1.0, http_timeout_s=10.0, max_bulk_size=100)


def test_similar_requests_share_a_cached_answer():
    assert cache_key(F) == cache_key(LatencyFeatures(kv_cache_usage=0.32, waiting_requests=2, running_requests=3,
                                                     input_tokens=920, prefix_match=0.5,
                                                     prefill_tokens_in_flight=1190))
    assert cache_key(F) != cache_key(LatencyFeatures(kv_cache_usage=0.31, waiting_requests=3, running_requests=3,
                                                     input_tokens=900, prefix_match=0.5,
                                                     prefill_tokens_in_flight=1200))


@pytest.mark.parametrize("delay_s", [0.0, 5.0])
def test_lookup_never_waits_and_uses_the_answer_once_it_came(delay_s):
    sidecars = FakeSidecars(delay_s=delay_s)
    url = f"http://127.0.0.1:{sidecars.port}"
    client = SidecarClient(SidecarConfig(url, (url,), flush_interval_s=0.05))
    try:
        t0 = time.perf_counter()
        assert client.lookup(F) is None  # asked for in the background
        assert time.perf_counter() - t0 < 0.05  # far below the slow sidecar's 5 s
        client.add_sample(F, ttft_ms=250.0, tpot_ms=0.0)
        if delay_s:  # a sidecar slower than the deadline: the call is given up, the hot path never noticed
            wait_until(lambda: client.status.prediction_failures >= 1, PREDICT_TIMEOUT_S + 5, "the call to time out")
            assert client.lookup(F) is None
            return
        wait_until(lambda: client.lookup(F) is not None, 5, "the prediction server's answer")
        p = client.lookup(F)
        assert (p.ttft_ms, p.tpot_ms) == (FakeSidecars.TTFT_MS, FakeSidecars.TPOT_MS)
        assert sidecars.predict_requests[0]["num_request_waiting"] == 2
        wait_until(lambda: sidecars.entries, 5, "the training entry")
        e = sidecars.entries[0]
        assert (e["actual_ttft_ms"], e["actual_tpot_ms"], e["input_token_length"], e["prefix_cache_score"]) == (
            250.0, 0.0, 900, 0.5)
    finally:
        client.close()
        sidecars.stop()


def test_unreachable_sidecars_fail_quietly():
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    client = SidecarClient(SidecarConfig(url, (url,), flush_interval_s=0.05))
    try:
        client.lookup(F)
        client.add_sample(F, ttft_ms=100.0, tpot_ms=0.0)
        wait_until(lambda: client.status.prediction_failures >= 1 and client.status.training_failures >= 1, 5,
                   "both calls to fail")
        assert client.lookup(F) is None
        assert client.status.last_error.startswith(("prediction: ", "training: "))
    finally:
        client.close()


def test_an_oversized_prediction_answer_is_refused():
    sidecars = FakeSidecars()
    sidecars.padding = MAX_PREDICT_RESPONSE_BYTES
    url = f"http://127.0.0.1:{sidecars.port}"
    client = SidecarClient(SidecarConfig(url, (url,), flush_interval_s=0.05))
    try:
        client.lookup(F)
        wait_until(lambda: client.status.prediction_failures >= 1, 5, "the oversized answer refused")
        assert client.lookup(F) is None and "larger than" in client.status.last_error
    finally:
        client.close()
        sidecars.stop()
