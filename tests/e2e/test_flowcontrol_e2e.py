"""Flow control end to end: the real Envoy in front of `epp serve` with the flowControl
feature gate, and real `epp sim` servers running in wall time (time scale 1) so a small
concurrency limit saturates the pool. The concurrency-detector (in-flight requests this
picker routed) is the saturation detector, so saturation follows the picker's own counts.

- two tenants (x-llm-d-inference-fairness-id) saturating the pool, one with three times the
  other's clients, get equal throughput shares (within 10%) under round-robin fairness;
- a band at capacity rejects with 429 and x-llm-d-request-dropped-reason: rejected-saturated;
- queued requests past defaultRequestTTL get the reference's 429 rejected-ttl-expired
  (pkg/epp/requestcontrol/admission.go, translateFlowControlOutcome);
- the reference's flow-control guide config starts unchanged (with its chart's flags) and routes.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from devstack.launch import wait_until
from epp.errors import DROPPED_REASON_HEADER
from tests.e2e.conftest import metric_sum, post
from tests.e2e.test_reference_configs import REFERENCE, chart_args, localise

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAIRNESS_HEADER = "x-llm-d-inference-fairness-id"


def config(max_concurrency: int, flow_control: str, plugins: str = "") -> str:
    return f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: concurrency-detector
  parameters: {{maxConcurrency: {max_concurrency}}}
{plugins}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: queue-scorer}}]
flowControl:
  saturationDetector: {{pluginRef: concurrency-detector}}
{flow_control}
"""


@pytest.mark.parametrize("policy", ["round-robin-fairness-policy", "program-aware-fairness"])
def test_round_robin_gives_two_tenants_equal_throughput(sim_servers, picker, envoy, policy):
    # program-aware-fairness (least attained service): equal-cost requests, so equal shares too
    sims = sim_servers(1, time_scale=1.0)
    p = picker(endpoints=sims.hostports, config_text=config(2, "  priorityBands: [{priority: 0, fairnessPolicyRef: rr}]",
                                                            f"- {{type: {policy}, name: rr}}"))
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"
    done: Counter[str] = Counter()
    failed: list[tuple[int, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()
    target = 60  # completions counted while both tenants are backlogged

    def client(tenant: str, k: int) -> None:
        i = 0
        while not stop.is_set():
            status, _, body = post(url, {"model": "m1", "prompt": f"{tenant} {k} {i}", "max_tokens": 4},
                                   {FAIRNESS_HEADER: tenant}, timeout=20)
            i += 1
            with lock:
                if stop.is_set():
                    return
                if status != 200:
                    failed.append((status, body))
                    stop.set()
                    return
                done[tenant] += 1
                if sum(done.values()) >= target:
                    stop.set()

    # tenant "heavy" has three times as many clients: FCFS would serve it ~3/4 of the time
    clients = [("heavy", k) for k in range(9)] + [("light", k) for k in range(3)]
    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(client, t, k) for t, k in clients]
        for f in futures:
            f.result(timeout=60)
    assert not failed, failed[:3]
    total = done["heavy"] + done["light"]
    share = done["light"] / total
    assert abs(share - 0.5) <= 0.05, done  # within 10% of the equal share (0.5 +- 0.05); global-strict: 15/60


def test_band_at_capacity_and_ttl_expiry_answer_as_the_reference(sim_servers, picker, envoy):
    sims = sim_servers(1, time_scale=1.0)
    p = picker(endpoints=sims.hostports,
               config_text=config(1, "  defaultRequestTTL: 2s\n  priorityBands: [{priority: 0, maxRequests: 2}]"))
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"
    with ThreadPoolExecutor(4) as pool:
        # one long request fills the pool's only slot (maxConcurrency 1) for longer than the TTL
        hold = pool.submit(post, url, {"model": "m1", "prompt": "hold", "max_tokens": 800}, {}, 30)
        wait_until(lambda: metric_sum(sims.metrics(0), "vllm:num_requests_running") >= 1, 10,
                   "the long request to run (the picker counts it in flight: saturation 1)")
        queued = [pool.submit(post, url, {"model": "m1", "prompt": f"queued {i}", "max_tokens": 2}, {}, 30)
                  for i in range(2)]
        wait_until(lambda: metric_sum(p.metrics(), "llm_d_epp_flow_control_queue_size") >= 2, 10,
                   "two requests queued")
        t0 = time.monotonic()
        status, headers, body = post(url, {"model": "m1", "prompt": "over", "max_tokens": 2})
        assert status == 429, body  # the band holds maxRequests 2
        assert headers.get(DROPPED_REASON_HEADER) == "rejected-saturated"
        assert time.monotonic() - t0 < 2.0  # refused at once, not queued until the TTL
        for f in queued:
            status, headers, body = f.result(timeout=30)
            assert status == 429, body
            assert headers.get(DROPPED_REASON_HEADER) == "rejected-ttl-expired"
        assert hold.result(timeout=30)[0] == 200
    status, _, body = post(url, {"model": "m1", "prompt": "after", "max_tokens": 2})
    assert status == 200, body  # the picker keeps serving


def test_flow_control_guide_config_starts_unchanged_and_routes(sim_servers, picker, envoy):
    sims = sim_servers(2)
    fixture = REFERENCE / "configs" / "llm-d-flow-control.yaml"
    p = picker(endpoints=sims.hostports, extra_flags=localise(chart_args("llm-d-guide", "optimized-baseline"),
                                                               fixture))
    env = envoy("full-duplex", p)
    before = sum(sims.served("m1"))
    status, _, body = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": "guide", "max_tokens": 3})
    assert status == 200 and json.loads(body)["choices"], body
    wait_until(lambda: sum(sims.served("m1")) >= before + 1, 10, "a simulator server to count the request")
    assert 'inference_pool=' in p.metrics() and "llm_d_epp_flow_control_pool_saturation" in p.metrics()
