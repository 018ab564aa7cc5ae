"""Pool mode end to end: `epp serve --pool-name` discovers simulator servers registered as
pods in the Kubernetes API stand-in, and real requests go through the real Envoy."""

from __future__ import annotations

import re

import openai
import pytest
from grpc_health.v1 import health_pb2

from devstack.launch import wait_until
from tests.e2e.conftest import health
from tests.kubeapi import KubeApiStandIn, inference_pool, model_rewrite

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ACTIVE_PORTS = "inference.networking.k8s.io/active-ports"


@pytest.fixture
def kube():
    api = KubeApiStandIn().start()
    try:
        yield api
    finally:
        api.stop()


def register_sim_pods(kube: KubeApiStandIn, ports: list[int]) -> list[str]:
    """One pod per simulator server: all on 127.0.0.1, each announcing its own port."""
    names = []
    for i, port in enumerate(ports):
        name = f"sim-{i}"
        kube.put_pod(name, "127.0.0.1", {"app": "sim", "inference.networking.k8s.io/engine-type": "vllm"},
                     annotations={ACTIVE_PORTS: str(port)})
        names.append(name)
    return names


def ready_pods(p) -> float:
    m = re.search(r'^inference_pool_ready_pods\{name="pool"\} (\S+)$', p.metrics(), re.M)
    return float(m.group(1)) if m else -1.0


def test_pool_mode_routes_through_envoy_and_follows_the_cluster(kube, sim_servers, picker, envoy, e2e_logs):
    sims = sim_servers(3, model="m1", time_scale=20)
    register_sim_pods(kube, sims.ports)
    kc = kube.write_kubeconfig(e2e_logs.dir / "kubeconfig")
    p = picker(tls=True, extra_flags=["--pool-name=pool", "--pool-namespace=default", f"--kubeconfig={kc}",
                                      "--metrics-endpoint-auth=false"])  # scraped below without a token
    assert health(p.health_port, "readiness") == health_pb2.HealthCheckResponse.NOT_SERVING  # no pool yet
    kube.apply(inference_pool("pool", {"app": "sim"}, sims.ports))
    wait_until(lambda: health(p.health_port, "readiness") == health_pb2.HealthCheckResponse.SERVING, 30,
               "readiness after the first sync")
    assert ready_pods(p) == 3
    env = envoy("full-duplex", p)
    c = openai.OpenAI(base_url=f"{env.url}/v1", api_key="unused", max_retries=0, timeout=30)

    before = sims.served()
    for i in range(30):
        r = c.completions.create(model="m1", prompt=f"request {i} " + "x" * (i * 7), max_tokens=2)
        assert r.model == "m1"
    wait_until(lambda: sum(sims.served()) - sum(before) >= 30, 10, "servers to count the requests")
    spread = [a - b for a, b in zip(sims.served(), before, strict=True)]
    assert sum(spread) == 30 and sum(1 for n in spread if n) >= 2, spread

    # A pod turning NotReady leaves the candidate set: no request reaches it any more.
    kube.set_pod_ready("sim-0", False)
    wait_until(lambda: ready_pods(p) == 2, 10, "sim-0 to leave the pool")
    before = sims.served()
    for i in range(20):
        c.completions.create(model="m1", prompt=f"after {i}", max_tokens=2)
    wait_until(lambda: sum(sims.served()) - sum(before) >= 20, 10, "servers to count the requests")
    spread = [a - b for a, b in zip(sims.served(), before, strict=True)]
    assert spread[0] == 0 and sum(spread) == 20, spread

    # An InferenceModelRewrite added at run time changes the model the server is asked for.
    kube.apply(model_rewrite("alias", "pool", [{"matches": [{"model": {"type": "Exact", "value": "food-review"}}],
                                                "targets": [{"modelRewrite": "m1", "weight": 1}]}]))

    def rewrite_decisions() -> float:
        c.completions.create(model="food-review", prompt="hi", max_tokens=2)
        m = re.search(r'^inference_extension_model_rewrite_decisions_total\{[^}]*target_model="m1"[^}]*\} (\S+)$',
                      p.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    wait_until(lambda: rewrite_decisions() > 0, 15, "the rewrite to reach the picker", interval=0.2)
    m1_before, food_before = sum(sims.served("m1")), sum(sims.served("food-review"))
    for i in range(5):
        c.completions.create(model="food-review", prompt=f"rewritten {i}", max_tokens=2)
    wait_until(lambda: sum(sims.served("m1")) - m1_before >= 5, 10, "servers to count the requests")
    assert sum(sims.served("m1")) - m1_before == 5 and sum(sims.served("food-review")) == food_before

    # Deleting every pod empties the pool: the picker answers 503 through Envoy.
    for name in ("sim-1", "sim-2"):
        kube.delete("pods", name)
    wait_until(lambda: ready_pods(p) == 0, 10, "the pool to empty")
    with pytest.raises(openai.APIStatusError) as err:
        c.completions.create(model="m1", prompt="nobody home", max_tokens=2)
    assert err.value.status_code == 503


def test_two_pickers_with_leader_election(kube, picker, e2e_logs, monkeypatch):
    """Exactly one of two `epp serve --ha-enable-leader-election` is ready; when it stops,
    the other takes over."""
    for name, value in (("EPP_LEASE_DURATION", "4s"), ("EPP_LEASE_RENEW_DEADLINE", "3s"),
                        ("EPP_LEASE_RETRY_PERIOD", "250ms")):
        monkeypatch.setenv(name, value)  # inherited by the picker processes
    kube.put_pod("sim-0", "127.0.0.1", {"app": "sim"})
    kube.apply(inference_pool("pool", {"app": "sim"}, [8000]))
    kc = kube.write_kubeconfig(e2e_logs.dir / "kubeconfig")
    flags = ["--pool-name=pool", "--pool-namespace=default", f"--kubeconfig={kc}", "--ha-enable-leader-election"]
    a, b = picker(extra_flags=flags), picker(extra_flags=flags)
    serving = health_pb2.HealthCheckResponse.SERVING
    ext_proc = "envoy.service.ext_proc.v3.ExternalProcessor"

    def states() -> tuple[bool, bool]:
        return tuple(health(x.health_port, "readiness") == serving for x in (a, b))

    wait_until(lambda: sum(states()) == 1, 30, "one ready leader")
    leader, follower = (a, b) if states()[0] else (b, a)
    assert health(follower.health_port, "liveness") == serving  # alive, just not leading
    assert health(follower.health_port, ext_proc) != serving and health(leader.health_port, ext_proc) == serving
    holder = kube.get("leases", "pool-epp-leader", group="coordination.k8s.io")["spec"]["holderIdentity"]
    assert holder.endswith(f"-{leader.process.pid}")
    leader.stop()  # SIGTERM: releases the lease
    wait_until(lambda: health(follower.health_port, "readiness") == serving, 15, "the follower to take over")
    holder = kube.get("leases", "pool-epp-leader", group="coordination.k8s.io")["spec"]["holderIdentity"]
    assert holder.endswith(f"-{follower.process.pid}")
