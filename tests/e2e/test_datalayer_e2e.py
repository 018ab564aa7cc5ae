"""The reference's data layer end to end: `epp serve` with a `dataLayer` config
(models-data-source -> models-data-extractor beside the injected metrics source), real
`epp sim` servers and the real Envoy. A LoRA adapter that one server has registered (its
/v1/models lists it) but never run (so vllm:lora_requests_info does not name it yet)
attracts its requests to that server; the other server does not know the adapter and
would answer 404."""

from __future__ import annotations

import json

import pytest

from devstack.launch import wait_until
from tests.e2e.api import explain, scorer_scores
from tests.e2e.conftest import Picker, post
from tests.e2e.test_scenarios import POLL, delta, fresh, wait_for_view

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODELS_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: models-data-source
  parameters: {interval: 100ms}
- type: models-data-extractor
- type: lora-affinity-scorer
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: lora-affinity-scorer, weight: 10}, {pluginRef: queue-scorer, weight: 1}, {pluginRef: max-score-picker}]
dataLayer:
  sources:
  - pluginRef: models-data-source
    extractors:
    - pluginRef: models-data-extractor
"""
ADAPTER = "sql-new"


def lora_scores(p: Picker, model: str) -> dict[str, float]:
    """The lora-affinity-scorer's raw score per endpoint for a request to `model` (Explain)."""
    resp, _ = explain(p.api_port, {"model": model, "prompt": "hi", "max_tokens": 2})
    return scorer_scores(resp, "lora-affinity-scorer")


def test_adapter_listed_only_by_v1_models_attracts_its_requests(sim_servers, picker, envoy):
    knows = sim_servers(1, model="base", time_scale=20, max_loras=1)
    other = sim_servers(1, model="base", time_scale=20, max_loras=1)
    status, _, text = post(knows.url(0) + "/v1/load_lora_adapter",
                           {"lora_name": ADAPTER, "lora_path": "/adapters/sql-new"})
    assert status == 200, text
    hostports = [knows.hostports[0], other.hostports[0]]
    p = picker(endpoints=hostports, config_text=MODELS_CONFIG)
    env = envoy("full-duplex", p)
    wait_for_view(p, lambda v: all(fresh(v[hp]) for hp in hostports), "fresh metrics of both servers")
    view: dict = {}
    wait_for_view(p, lambda v: view.update(v) or True, "a view")
    assert all(ADAPTER not in view[hp].metrics.running_lora_adapters for hp in hostports), \
        "the adapter must be known from /v1/models only, not from the metrics"
    names = {hp: view[hp].name for hp in hostports}
    wait_until(lambda: lora_scores(p, ADAPTER).get(names[knows.hostports[0]]) == pytest.approx(0.9), 20,
               "the picker to learn the adapter from /v1/models", interval=POLL)
    assert lora_scores(p, ADAPTER)[names[other.hostports[0]]] < 0.9

    before = [knows.served()[0], other.served()[0]]
    results = [post(f"{env.url}/v1/completions", {"model": ADAPTER, "prompt": f"adapter request {k}",
                                                  "max_tokens": 2}) for k in range(6)]
    assert [r[0] for r in results] == [200] * 6, [r for r in results if r[0] != 200][:2]
    assert all(json.loads(r[2])["model"] == ADAPTER for r in results)
    served = delta([knows.served()[0], other.served()[0]], before)
    assert served == [6, 0], served


FILE_DISCOVERY_CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: file-discovery
  parameters: {{path: {path}, watchFile: true}}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: queue-scorer}}
dataLayer:
  discovery:
    pluginRef: file-discovery
"""


def endpoints_yaml(hostports: list[str]) -> str:
    """The reference's file-discovery format (ports as strings)."""
    lines = ["endpoints:"]
    for i, hp in enumerate(hostports):
        host, port = hp.rsplit(":", 1)
        lines += [f"  - name: sim-{i}", f'    address: "{host}"', f'    port: "{port}"']
    return "\n".join(lines) + "\n"


def test_file_discovery_is_the_endpoint_source_and_edits_apply(sim_servers, picker, envoy, tmp_path):
    sims = sim_servers(2, model="m1", time_scale=20)
    path = tmp_path / "endpoints.yaml"
    path.write_text(endpoints_yaml(sims.hostports[:1]))
    p = picker(config_text=FILE_DISCOVERY_CONFIG.format(path=path))
    env = envoy("full-duplex", p)
    wait_for_view(p, lambda v: set(v) == {sims.hostports[0]} and fresh(v[sims.hostports[0]]), "the file's endpoint")
    before = sims.served()
    assert [post(f"{env.url}/v1/completions", {"model": "m1", "prompt": f"file {k}", "max_tokens": 2})[0]
            for k in range(4)] == [200] * 4
    assert delta(sims.served(), before) == [4, 0]
    tmp = tmp_path / "endpoints.yaml.new"  # an editor's rename-replace
    tmp.write_text(endpoints_yaml(sims.hostports[1:]))
    tmp.replace(path)
    wait_for_view(p, lambda v: set(v) == {sims.hostports[1]} and fresh(v[sims.hostports[1]]), "the edited file")
    before = sims.served()
    assert [post(f"{env.url}/v1/completions", {"model": "m1", "prompt": f"edited {k}", "max_tokens": 2})[0]
            for k in range(4)] == [200] * 4
    assert delta(sims.served(), before) == [0, 4]
