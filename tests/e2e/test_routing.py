"""Through the real Envoy 1.40 binary (full-duplex and buffered ext_proc) in front of the
picker (`epp serve`) and three `epp sim` servers."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from devstack.launch import wait_until
from filters.conformance import SELECTION_HEADER, SERVED_HEADER
from tests.e2e.api import endpoint, write_endpoints
from tests.e2e.conftest import post

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODES = ["full-duplex", "buffered"]
CONFORMANCE_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: random-picker
"""


def client(env) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{env.url}/v1", api_key="unused", max_retries=0, timeout=30)


def check_openai_round_trip(c: openai.OpenAI, model: str) -> None:
    """Completions and chat, streamed and not, parsed strictly by the openai client."""
    r = c.completions.create(model=model, prompt="The quick brown fox", max_tokens=6)
    assert r.model == model and r.choices[0].text and r.usage.completion_tokens == 6
    chunks = list(c.completions.create(model=model, prompt="Once upon a time", max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}))
    assert all(ch.model == model for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert chunks[-1].usage.completion_tokens == 6
    chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}],
                                     max_tokens=5)
    assert chat.model == model and chat.choices[0].message.content and chat.usage.completion_tokens == 5
    stream = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert stream[-1].usage.completion_tokens == 5 and all(ch.model == model for ch in stream)


@pytest.mark.parametrize("mode", MODES)
def test_completions_and_chat_come_back_intact(mode, module_sim_servers, picker, envoy):
    sims = module_sim_servers
    tls = mode == "full-duplex"  # one TLS (Envoy's TLS cluster), one plaintext
    p = picker(endpoints=sims.hostports, tls=tls)
    env = envoy(mode, p)
    before = sum(sims.served())
    check_openai_round_trip(client(env), "m1")
    assert sum(sims.served()) - before == 4
    metrics = p.metrics()
    assert 'inference_objective_request_total{model_name="m1",priority="0",target_model_name="m1"} 4.0' in metrics
    assert "inference_extension_scheduler_e2e_duration_seconds_count 4.0" in metrics
    assert 'inference_objective_output_tokens_sum{model_name="m1",target_model_name="m1"} 22.0' in metrics
    assert 'inference_pool_ready_pods{name="static"} 3.0' in metrics


@pytest.mark.parametrize("mode", MODES)
def test_header_selection_lands_on_selected_servers(mode, module_sim_servers, picker, envoy):
    """The conformance suite's main test: 100 requests at concurrency 10 selecting 1, 2 or 3
    servers, counted by the servers themselves."""
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports, config_text=CONFORMANCE_CONFIG)
    env = envoy(mode, p)
    rng = random.Random(7)
    url = f"{env.url}/v1/completions"
    for k, n in ((1, 34), (2, 33), (3, 33)):
        selected = sorted(rng.sample(range(3), k))
        selection = ",".join(sims.hostports[i] for i in selected)
        before = sims.served()

        def one(i: int, selection: str = selection) -> tuple[int, str]:
            status, headers, _ = post(url, {"model": "m1", "prompt": f"request {i}", "max_tokens": 2},
                                      {SELECTION_HEADER: selection})
            return status, headers.get(SERVED_HEADER, "")

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(one, range(n)))
        assert [s for s, _ in results] == [200] * n
        assert {served for _, served in results} <= {sims.hostports[i] for i in selected}
        after = sims.served()
        delta = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(delta) == n
        assert all(delta[i] == 0 for i in range(3) if i not in selected), (selected, delta)
        if k > 1:  # random picker: the load is spread over the selection
            assert sum(1 for i in selected if delta[i] > 0) >= 2


@pytest.mark.parametrize("mode", MODES)
def test_bad_json_gets_400_with_reference_body(mode, module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports)
    env = envoy(mode, p)
    before = sum(sims.served())
    status, headers, body = post(f"{env.url}/v1/completions", b'{"model": "m1", "prompt": ')
    assert status == 400
    assert body.startswith(b"inference error: BadRequest - request body is not valid JSON")
    assert headers["content-type"] == "text/plain"
    status, _, body = post(f"{env.url}/v1/completions", {"prompt": "no model"})
    assert (status, body) == (400, b"inference error: BadRequest - model not found in request body")
    assert sum(sims.served()) == before
    assert 'error_code="BadRequest"' in p.metrics()


@pytest.mark.parametrize("mode", MODES)
def test_model_rewrite_from_endpoints_file(mode, module_sim_servers, picker, envoy, e2e_logs):
    """The server sees the rewritten model (it only serves m1); the client gets its own name back."""
    sims = module_sim_servers
    path = e2e_logs.dir / "endpoints.yaml"
    write_endpoints(path, [endpoint(f"sim-{i}", port) for i, port in enumerate(sims.ports)], modelRewrites=[
        {"name": "alias", "rules": [{"matches": [{"model": {"type": "Exact", "value": "my-alias"}}],
                                     "targets": [{"modelRewrite": "m1", "weight": 1}]}]}])
    p = picker(endpoints_file=str(path))
    env = envoy(mode, p)
    before = sum(sims.served("m1"))
    check_openai_round_trip(client(env), "my-alias")
    assert sum(sims.served("m1")) - before == 4
    assert sum(sims.served("my-alias")) == 0
    # a client that sends the system's destination header does not choose the endpoint
    status, _, body = post(f"{env.url}/v1/completions", {"model": "my-alias", "prompt": "x", "max_tokens": 1},
                           {"x-gateway-destination-endpoint": "127.0.0.1:1"})
    assert status == 200 and json.loads(body)["model"] == "my-alias"


def test_restarted_picker_is_used_again_without_restarting_envoy(module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports)
    env = envoy("full-duplex", p)
    url = f"{env.url}/v1/completions"
    body = {"model": "m1", "prompt": "before", "max_tokens": 1}
    assert post(url, body)[0] == 200
    p.kill()
    status, _, _ = post(url, body)
    assert status >= 500  # FULL_DUPLEX cannot fail open: the picker is gone
    p.start()
    wait_until(lambda: post(url, body)[0] == 200, 30, "Envoy to use the restarted picker")
    before = sum(sims.served())
    for _ in range(5):
        assert post(url, body)[0] == 200
    assert sum(sims.served()) - before == 5
    assert 'inference_objective_request_total{model_name="m1",priority="0",target_model_name="m1"}' in p.metrics()


def test_logs_name_request_model_and_endpoint_never_the_prompt(module_sim_servers, picker, envoy):
    """At debug level every routed request is logged with its id, model and endpoint; no log
    line carries prompt text, also when the request fails."""
    p = picker(endpoints=module_sim_servers.hostports, extra_flags=["--log-level=debug"])
    env = envoy("full-duplex", p)
    secret = "zebra-quartz-umbrella " * 20
    status, _, _ = post(f"{env.url}/v1/completions", {"model": "m1", "prompt": secret, "max_tokens": 2},
                        {"x-request-id": "req-log-1"})
    assert status == 200
    status, _, _ = post(f"{env.url}/v1/completions", b'{"model": "m1", "prompt": "' + secret.encode() + b'"',
                        {"x-request-id": "req-log-2"})
    assert status == 400
    wait_until(lambda: "req-log-2" in p.log(), 10, "the failed request's log line")
    log = p.log()
    routed = [line for line in log.splitlines() if "req-log-1" in line]
    assert routed and "model=m1" in routed[0]
    assert any(hp in routed[0] for hp in module_sim_servers.hostports)
    assert "zebra" not in log
