"""Latency-aware routing through the real Envoy: the reference charts' latency-predictor
variants start unchanged and route (with their predictor sidecars answering, and with the
sidecar URLs pointing at nothing: the in-process model takes over), the latency-slo-admitter
rejects a sheddable request whose TTFT SLO no endpoint can meet, and with an SLO the picker
sends work to the endpoint with headroom (an H100-like server) over the slower one (A100-like)
that the queue scorer likes as well."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from devstack.launch import free_ports, wait_until
from epp.apicli import format_endpoints, format_explain
from tests.e2e.api import endpoint, explain, list_endpoints, objectives, write_endpoints
from tests.e2e.conftest import metric_sum, post
from tests.e2e.test_reference_configs import REFERENCE, chart_args, localise
from tests.latency_sidecars import FakeSidecars

pytestmark = pytest.mark.e2e

GPU = "nvidia.com/gpu.product"


@pytest.fixture
def sidecars():
    s = FakeSidecars()
    yield s
    s.stop()


def body(tag: str, prompt_words: int, max_tokens: int = 2) -> dict:
    """A completion whose words are its own: no prefix-cache hit anywhere, so latencies are regular."""
    return {"model": "m1", "prompt": " ".join(f"q{tag}w{k}" for k in range(prompt_words)), "max_tokens": max_tokens}


def send(url: str, n: int, *, prompt_words: int = 50, headers: dict[str, str] | None = None,
         max_tokens: int = 2, workers: int = 8) -> list[int]:
    tag = random.getrandbits(32)

    def one(i: int) -> int:
        return post(f"{url}/v1/completions", body(f"{tag}x{i}", prompt_words, max_tokens), headers)[0]

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


CHARTS = [("gie-v1.5-chart-latency-predictor.yaml", "gie-v1.5-inferencepool"),
          ("llm-d-router-chart-latency-predictor.yaml", "llm-d-router-gateway")]


@pytest.mark.parametrize("fixture, chart", CHARTS, ids=[c[0] for c in CHARTS])
@pytest.mark.parametrize("with_sidecars", [True, False], ids=["sidecars", "sidecars-unreachable"])
def test_chart_latency_variant_starts_unchanged_and_routes(fixture, chart, with_sidecars, module_sim_servers,
                                                           picker, envoy, sidecars, monkeypatch):
    sims = module_sim_servers
    (dead,) = free_ports(1)
    port = sidecars.port if with_sidecars else dead
    # the environment the chart variant gives the picker container
    monkeypatch.setenv("TRAINING_SERVER_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("PREDICTION_SERVER_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("LATENCY_MAX_SAMPLE_SIZE", "10000")
    monkeypatch.setenv("LATENCY_MAX_CONCURRENT_DISPATCHES", "36")
    monkeypatch.setenv("LATENCY_COALESCE_WINDOW_MS", "1")
    monkeypatch.setenv("LATENCY_FLUSH_INTERVAL_SEC", "0.2")
    p = picker(endpoints=sims.hostports,
               extra_flags=localise(chart_args(chart, "latency-predictor"), REFERENCE / "configs" / fixture))
    env = envoy("full-duplex", p)
    assert send(env.url, 40) == [200] * 40
    name = 'plugin_name="predicted-latency-producer"'
    if with_sidecars:
        wait_until(lambda: len(sidecars.entries) >= 40, 10, "training entries at the training server")
        e = sidecars.entries[0]
        assert {"kv_cache_percentage", "input_token_length", "num_request_waiting", "num_request_running",
                "actual_ttft_ms", "actual_tpot_ms", "prefix_cache_score", "timestamp"} <= set(e)
        assert e["actual_ttft_ms"] > 0 and e["actual_tpot_ms"] == 0  # not streaming: TTFT is the whole request
        wait_until(lambda: sidecars.predict_requests, 10, "the prediction server asked (from the client's thread)")
        # once its answers are cached, they are what the scorers see (the in-process model has < 64 samples)
        assert send(env.url, 10) == [200] * 10
        text = p.metrics()
        count = metric_sum(text, "llm_d_epp_request_predicted_ttft_seconds_count")
        assert count >= 1
        assert metric_sum(text, "llm_d_epp_request_predicted_ttft_seconds_sum") == pytest.approx(
            count * FakeSidecars.TTFT_MS / 1000)
    else:  # nothing answers: the in-process model learns and predicts, and no request failed
        assert send(env.url, 60) == [200] * 60
        wait_until(lambda: metric_sum(p.metrics(), "llm_d_epp_latency_prediction_training_samples",
                                      target="ttft", endpoint_class="*") >= 64, 10, "the in-process model to learn")
        assert send(env.url, 10) == [200] * 10
        assert metric_sum(p.metrics(), "llm_d_epp_request_predicted_ttft_seconds_count") >= 1
        # the requests since are scored against the predictions made for them: the error gauges appear
        wait_until(lambda: "llm_d_epp_latency_prediction_mape{" in p.metrics(), 10, "the prediction error")
    assert name in p.metrics()
    assert "Traceback" not in p.log()


def test_predicted_latency_guide_starts_unchanged_and_routes_streams(module_sim_servers, picker, envoy):
    """llm-d's predicted-latency guide (its router values; the guide's clients stream)."""
    p = picker(endpoints=module_sim_servers.hostports, extra_flags=[
        f"--config-file={REFERENCE / 'configs' / 'llm-d-predicted-latency.yaml'}", "--v=2"])
    env = envoy("full-duplex", p)
    for i in range(5):
        status, headers, body = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": f"stream {i}",
                                                                   "max_tokens": 3, "stream": True},
                                     {"x-llm-d-slo-ttft-ms": "500", "x-llm-d-slo-tpot-ms": "50"})
        assert status == 200 and b"data: [DONE]" in body, body
    assert "Traceback" not in p.log()


def endpoints_file(directory: Path, hostports: list[str], products: list[str]) -> str:
    return write_endpoints(directory / "endpoints.json",
                           [endpoint(f"sim-{i}", hp, {GPU: gpu}) for i, (hp, gpu) in enumerate(zip(hostports, products, strict=True))],
                           objectives=objectives(batch=-1))


ADMIT_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
- type: latency-slo-admitter
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins: [{pluginRef: queue-scorer}]
"""


def test_admitter_rejects_a_sheddable_request_no_endpoint_can_serve(sim_servers, picker, envoy, e2e_logs):
    sims = sim_servers(2, time_scale=5, num_gpu_blocks=400)
    p = picker(endpoints_file=endpoints_file(e2e_logs.dir, sims.hostports, ["h100", "h100"]),
               config_text=ADMIT_CONFIG)
    env = envoy("full-duplex", p)
    assert send(env.url, 100) == [200] * 100  # the model learns from these
    wait_until(lambda: metric_sum(p.metrics(), "llm_d_epp_latency_prediction_training_samples", target="ttft",
                                  endpoint_class="*") >= 64, 10, "the in-process model to learn")
    stop = threading.Event()

    def load() -> None:  # keeps both servers busy (running > 0) and warm (KV >= 2 %)
        while not stop.is_set():
            post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "busy " * 400, "max_tokens": 200})

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(metric_sum(sims.metrics(i), "vllm:num_requests_running") > 0 and
                               metric_sum(sims.metrics(i), "vllm:kv_cache_usage_perc") >= 0.02 for i in range(2)),
                   10, "both servers busy")
        sheddable = {"x-llm-d-inference-objective": "batch", "x-llm-d-slo-ttft-ms": "1"}

        def rejected() -> bool:
            status, headers, body = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "hi",
                                                                       "max_tokens": 1}, sheddable)
            return status == 500 and body == (b"inference error: Internal - request cannot be admitted: "
                                               b"no valid endpoint available to serve the request")

        wait_until(rejected, 10, "the sheddable request with an unmeetable TTFT SLO to be rejected")
        legacy: list = []  # the older header, as the reference; polled too: each answer reads a fresh scrape

        def rejected_by_legacy_header() -> bool:
            legacy[:] = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "hi", "max_tokens": 1},
                             {"x-slo-ttft-ms": "1", "x-llm-d-inference-objective": "batch"})[:2]
            return legacy[0] == 500

        wait_until(rejected_by_legacy_header, 10, "the legacy x-slo-ttft-ms header's request to be rejected")
        assert "x-llm-d-request-dropped-reason" not in legacy[1]
        # not sheddable, no SLO, or an SLO that can be met: admitted
        assert post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "hi", "max_tokens": 1},
                    {"x-llm-d-slo-ttft-ms": "1"})[0] == 200
        assert post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "hi", "max_tokens": 1},
                    {"x-llm-d-inference-objective": "batch"})[0] == 200
        assert post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "hi", "max_tokens": 1},
                    {**sheddable, "x-llm-d-slo-ttft-ms": "600000"})[0] == 200
    finally:
        stop.set()
        for t in threads:
            t.join(30)


HEADROOM_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: predicted-latency-producer
- type: slo-headroom-tier-filter
  parameters: {epsilonExploreNeg: 0}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: slo-headroom-tier-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
"""


def test_with_an_slo_the_endpoint_with_headroom_wins_over_the_queue_score(sim_servers, picker, envoy, e2e_logs):
    """An H100-like and an A100-like server (the A100 prefills ~2.2x slower); equal queues, so
    the queue scorer alone splits the requests between them. With a TTFT SLO between the two
    servers' latencies, the A100 has no headroom and gets (almost) none of them."""
    sims = sim_servers(2, time_scale=1, hardware="h100,a100")
    p = picker(endpoints_file=endpoints_file(e2e_logs.dir, sims.hostports, ["h100", "a100"]),
               config_text=HEADROOM_CONFIG)
    env = envoy("full-duplex", p)
    words = 120  # ~1,100 tokens: ~70 ms to the end on the H100, ~140 ms on the A100, when alone
    # no SLO: no headroom anywhere, all kept, and the queue scorer's ties split the traffic; two at a
    # time, so each server is learnt idle and with a request beside (one at a time below: idle)
    assert send(env.url, 200, prompt_words=words, workers=2) == [200] * 200
    before = sims.served("m1")
    assert min(before) >= 64, before
    wait_until(lambda: all(metric_sum(p.metrics(), "llm_d_epp_latency_prediction_training_samples", target="ttft",
                                      endpoint_class=c) >= 64 for c in ("h100", "a100")), 10, "both classes learnt")
    # the SLO: halfway between the two servers' predicted TTFTs for such a request (p90; ~80 and ~180 ms)
    resp, _ = explain(p.api_port, body("probe", words), {})
    fast, slow = (next(x.ttft_ms for x in resp.latency_predictions if x.endpoint == n) for n in ("sim-0", "sim-1"))
    assert slow > 1.3 * fast, (fast, slow)  # the A100 is the slower, and the model knows it
    slo_ms = round((fast + slow) / 2)
    slo = {"x-llm-d-slo-ttft-ms": str(slo_ms)}
    resp, endpoints = explain(p.api_port, body("probe", words), slo)
    predicted = {x.endpoint: x for x in resp.latency_predictions}
    assert resp.slo_ttft_ms == slo_ms and predicted["sim-0"].meets_slo and not predicted["sim-1"].meets_slo
    for x in predicted.values():
        assert x.ttft_headroom_ms == pytest.approx(slo_ms - x.ttft_ms)
    text = format_explain(resp)
    assert f"latency SLO: TTFT {slo_ms} ms" in text and "latency predicted-latency-producer: sim-1 TTFT" in text
    status = {e.name: dict(e.status) for e in endpoints.endpoints}
    assert status["sim-1"]["latency-class"] == "a100" and status["sim-0"]["latency-class"] == "h100"
    assert status["sim-1"]["latency-ttft-samples"].endswith("(class)")
    assert status["sim-1"]["latency-ttft-mape"].endswith("%") and "latency-ttft-p90-error" in status["sim-0"]
    assert "latency-ttft-mape=" in format_endpoints(endpoints)
    for i in range(40):  # one at a time, each on an idle pool
        wait_until(lambda: not any(e.in_flight_requests for e in list_endpoints(p.api_port).endpoints), 10,
                   "the previous request to complete")
        assert post(f"{env.url}/v1/completions", body(f"slo{i}", words), slo)[0] == 200
    after = sims.served("m1")
    to_fast, to_slow = after[0] - before[0], after[1] - before[1]
    assert to_fast >= 36 and to_slow <= 4, (to_fast, to_slow)
