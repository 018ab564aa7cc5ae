"""data-parallel-profile-handler end to end, shaped as the reference's DP deployment: one pod
(`epp sim --replicas 4 --data-parallel-size 4`) with an API server per rank on four ports,
each rank an endpoint of the pool; the picker picks a rank, Envoy is sent to the pod's
primary port with the rank in `x-data-parallel-host-port`, and the primary (the routing
sidecar) hands the request to that rank. The prefix index is keyed by the rank's own
endpoint, so a repeated prompt returns to the rank that cached it."""

from __future__ import annotations

import json

import pytest

from devstack.launch import wait_until
from tests.e2e.conftest import metric_sum, post

pytestmark = pytest.mark.e2e

CONFIG = """
plugins:
- {type: data-parallel-profile-handler, parameters: {primaryPort: PRIMARY}}
- {type: prefix-cache-scorer}
- {type: queue-scorer}
schedulingProfiles:
- {name: dp, plugins: [{pluginRef: prefix-cache-scorer, weight: 5}, {pluginRef: queue-scorer}]}
"""


def test_requests_reach_the_picked_rank_through_the_primary_port(sim_servers, picker, envoy):
    pod = sim_servers(4, data_parallel_size=4)
    p = picker(endpoints=pod.hostports, config_text=CONFIG.replace("PRIMARY", str(pod.ports[0])))
    url = f"{envoy('full-duplex', p).url}/v1/completions"

    def served() -> list[float]:
        return [metric_sum(pod.metrics(i), "sim_requests_total") for i in range(4)]

    def routed() -> dict[str, float]:  # what the primary handed to each rank
        text = pod.metrics(0)
        return {hp: metric_sum(text, "sim_data_parallel_routed_total", rank=hp) for hp in pod.hostports}

    conversation = "a conversation that stays on its rank " * 60
    for k in range(4):
        status, _, body = post(url, {"model": "m1", "prompt": conversation + f"turn {k}", "max_tokens": 2})
        assert status == 200 and json.loads(body)["choices"], body
    wait_until(lambda: sum(served()) == 4, 20, "the ranks to count four requests")
    home = max(range(4), key=lambda i: served()[i])
    assert served()[home] == 4  # every turn went back to the rank holding the prefix
    assert routed()[pod.hostports[home]] == 4  # ... through the primary port

    for k in range(8):  # unrelated prompts spread over the ranks, each through the primary
        assert post(url, {"model": "m1", "prompt": f"{k} unrelated " * 40, "max_tokens": 2})[0] == 200
    wait_until(lambda: sum(served()) == 12, 20, "the ranks to count twelve requests")
    assert sum(1 for n in served() if n) >= 2
    assert sum(routed().values()) == 12

    status, _, body = post(pod.url(0) + "/v1/completions", {"model": "m1", "prompt": "x", "max_tokens": 1},
                           headers={"x-data-parallel-host-port": "127.0.0.1:1"})
    assert status == 400 and b"names no data-parallel rank" in body  # as the sidecar: not a rank of this pod
