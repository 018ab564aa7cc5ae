"""--emit-endpoint-scores through the real Envoy 1.40: with the scores struct next to the
destination in envoy.lb, every ext_proc mode (ORIGINAL_DST by header or metadata, and the
override_host policy reading envoy.lb's destination key) still sends each request to the
server the picker chose, counted by the servers themselves. (The metadata's content is
asserted on the ext_proc replies in tests/test_endpoint_scores.py over both transports.)"""

from __future__ import annotations

import pytest

from filters.conformance import SELECTION_HEADER
from tests.e2e.conftest import post
from tests.e2e.test_scenarios import delta

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The filter keeps the endpoint named by the header; the scorer gives every candidate a score,
# so the scores struct is emitted on every request.
CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: header-based-testing-filter}, {pluginRef: queue-scorer, weight: 2}, {pluginRef: max-score-picker}]
"""


@pytest.mark.parametrize("mode", ["full-duplex", "buffered", "override-host"])
def test_routing_follows_the_pick_with_scores_emitted(mode, module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports, config_text=CONFIG, extra_flags=["--emit-endpoint-scores"])
    env = envoy(mode, p, backends=sims.hostports) if mode == "override-host" else envoy(mode, p)
    url = f"{env.url}/v1/completions"
    for target in (2, 0, 1):
        before = sims.served()
        for i in range(4):
            status, _, body = post(url, {"model": "m1", "prompt": f"scored {i}", "max_tokens": 2},
                                   {SELECTION_HEADER: sims.hostports[target]})
            assert status == 200, body
        landed = delta(sims.served(), before)
        assert landed == [4 if i == target else 0 for i in range(3)], (mode, target, landed)
