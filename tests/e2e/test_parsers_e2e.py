"""Through the real Envoy: the default parser chain routes Anthropic /v1/messages (with
prefix affinity on its system prompt) and bodies no parser understands (passthrough);
the canonical and the old objective headers both select priority, and a shed request
carries x-llm-d-request-dropped-reason. Where a request went is read from the verifier's
served-endpoint header, which the picker sets on every response."""

from __future__ import annotations

import json

import pytest

from devstack.launch import wait_until
from epp.errors import DROPPED_REASON_HEADER as DROPPED_REASON
from filters.conformance import SERVED_HEADER
from tests.e2e.api import by_port, objectives, write_endpoints
from tests.e2e.conftest import metric_sum, post
from tests.e2e.test_scenarios import fresh, hot_queue_seen, overloaded_pool, run_concurrently, wait_for_view

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
__all__ = ["overloaded_pool"]  # the shared saturated pool fixture, used here too

PREFIX_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: destination-endpoint-served-verifier
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: prefix-cache-scorer, weight: 1}, {pluginRef: max-score-picker}]
"""


def messages(system: str, question: str) -> dict:
    return {"model": "m1", "max_tokens": 4, "system": [{"type": "text", "text": system}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": question}]}]}


@pytest.mark.parametrize("mode", ["full-duplex", "buffered"])
def test_anthropic_messages_are_routed_with_prefix_affinity(mode, module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports, config_text=PREFIX_CONFIG)
    env = envoy(mode, p)
    url = f"{env.url}/v1/messages"
    served: dict[int, list[str]] = {}
    for k in range(4):  # four system prompts, two questions each: by chance all four pairs agree 1 time in 81
        system = f"You are agent number {k} of {mode}; answer briefly and precisely. " * 30
        for question in ("What is the capital of France?", "And of Italy?"):
            status, headers, body = post(url, messages(system, question))
            assert status == 200, body
            assert headers.get(SERVED_HEADER) in sims.hostports, headers
            served.setdefault(k, []).append(headers[SERVED_HEADER])
    assert all(a == b for a, b in served.values()), served
    metrics = p.metrics()
    assert metric_sum(metrics, "inference_objective_request_total", model_name="m1") >= 8
    assert 'error_code="BadRequest"' not in metrics


@pytest.mark.parametrize("mode", ["full-duplex", "buffered"])
def test_bodies_no_parser_understands_are_passed_through(mode, module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports, config_text=PREFIX_CONFIG)
    env = envoy(mode, p)
    # vLLM's /tokenize is not an OpenAI API: passthrough routes it and the server answers it
    status, headers, body = post(f"{env.url}/tokenize", {"prompt": "hello there"})
    assert status == 200 and json.loads(body)["count"] > 0
    assert headers.get(SERVED_HEADER) in sims.hostports
    # not JSON at all, on a path nobody claims: routed, not refused with 400
    status, headers, _ = post(f"{env.url}/v1/rerank", b"\x00\x01 binary payload \xff")
    assert status == 404 and headers.get(SERVED_HEADER) in sims.hostports
    assert 'error_code="BadRequest"' not in p.metrics()


def test_canonical_and_old_objective_headers_both_shed_and_say_why(overloaded_pool, picker, envoy, e2e_logs):
    """Saturation is (20/5 + 0 + 0) / 3 = 1.33 with the hot server in the pool (see
    test_scenarios): a sheddable objective is refused with 429 and the dropped reason,
    whichever header names it; the canonical name wins when both are sent."""
    pool = overloaded_pool
    path = e2e_logs.dir / "endpoints.yaml"
    write_endpoints(path, by_port(pool.hostports), objectives=objectives(batch=-1, interactive=10))
    p = picker(endpoints_file=str(path))
    env = envoy("full-duplex", p)
    wait_for_view(p, lambda v: len(v) == 3 and hot_queue_seen(pool)(v) and all(fresh(e) for e in v.values()),
                  "the picker to see the saturated pool")
    url = f"{env.url}/v1/completions"
    cases = [
        ({"x-llm-d-inference-objective": "batch"}, 429),
        ({"x-gateway-inference-objective": "batch"}, 429),
        ({"x-llm-d-inference-objective": "batch", "x-gateway-inference-objective": "interactive"}, 429),
        ({"x-llm-d-inference-objective": "interactive", "x-gateway-inference-objective": "batch"}, 200),
        ({"x-llm-d-inference-objective": "interactive"}, 200),
        ({}, 200),
    ]

    def ask(k: int) -> tuple[int, dict[str, str], bytes]:
        return post(url, {"model": "m1", "prompt": f"objective header check {k}", "max_tokens": 2}, cases[k][0],
                    timeout=10)

    wait_until(lambda: ask(0)[0] == 429, 10, "the picker to count the pool as saturated", interval=0.1)
    results = run_concurrently(ask, len(cases), concurrency=3)
    for (headers, want), (status, got, body) in zip(cases, results, strict=True):
        assert status == want, (headers, status, body)
        if want == 429:
            assert body.startswith(b"inference error: ResourceExhausted - ")
            assert got.get(DROPPED_REASON) == "rejected-saturated", got
        else:
            assert DROPPED_REASON not in got
