"""Leader election on a Lease held in the API stand-in: exactly one leader, takeover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from epp.discovery.kubernetes import LeaderElector
from epp.options import parse_args
from tests.kubeapi import KubeApiStandIn
from tests.servers import eventually

TIMING = {"lease_duration": 4.0, "renew_deadline": 3.0, "retry_period": 0.25}


@pytest.fixture
def kube() -> Iterator[KubeApiStandIn]:
    with KubeApiStandIn() as api:
        yield api


@pytest.fixture
async def electors(kube: KubeApiStandIn, tmp_path) -> AsyncIterator[tuple[LeaderElector, LeaderElector,
                                                                           dict[str, list[bool]]]]:
    """Two electors for one lease (a and b, not started) and the leadership changes each saw;
    both stopped (a no-op for one never started or already stopped) after the test."""
    kc = kube.write_kubeconfig(tmp_path / "kubeconfig")
    options = parse_args(["--pool-name=pool", f"--kubeconfig={kc}", "--ha-enable-leader-election"])
    changes: dict[str, list[bool]] = {"a": [], "b": []}
    a = LeaderElector(options, identity="a", on_change=changes["a"].append, **TIMING)
    b = LeaderElector(options, identity="b", on_change=changes["b"].append, **TIMING)
    yield a, b, changes
    await a.stop()
    await b.stop()


async def exactly_one_leader(a: LeaderElector, b: LeaderElector, watch_for: float = 1.0) -> LeaderElector:
    await eventually(lambda: a.is_leader or b.is_leader, "a leader")
    deadline = time.monotonic() + watch_for
    while time.monotonic() < deadline:
        assert a.is_leader != b.is_leader, "both or neither lead"
        await asyncio.sleep(0.05)
    return a if a.is_leader else b


def holder(kube: KubeApiStandIn) -> str:
    lease = kube.get("leases", "pool-epp-leader", group="coordination.k8s.io")
    return (lease or {}).get("spec", {}).get("holderIdentity", "")


async def test_one_leader_and_takeover_after_clean_stop(kube, electors):
    a, b, changes = electors
    await a.start()
    await b.start()
    leader = await exactly_one_leader(a, b)
    follower = b if leader is a else a
    assert holder(kube) == leader.identity and changes[leader.identity] == [True]
    await leader.stop()  # releases the lease
    await eventually(lambda: follower.is_leader, "the follower takes over", timeout=TIMING["lease_duration"] + 5)
    assert holder(kube) == follower.identity
    # on_change is delivered to the loop after the flag flips (call_soon_threadsafe): wait for it
    await eventually(lambda: changes[leader.identity] == [True, False] and changes[follower.identity] == [True],
                     "both leadership changes delivered")
    assert changes[leader.identity] == [True, False] and changes[follower.identity] == [True]


async def test_takeover_after_the_leader_dies_without_releasing(kube, electors):
    a, b, _ = electors
    await a.start()
    await eventually(lambda: a.is_leader, "a leads")
    await b.start()
    await asyncio.sleep(TIMING["retry_period"] * 3)
    assert not b.is_leader  # a renews, so b must wait
    died = time.monotonic()
    await a.stop(release=False)  # as a crash: the lease stays held until it expires
    assert holder(kube) == "a"
    await eventually(lambda: b.is_leader, "b takes over after expiry", timeout=TIMING["lease_duration"] + 8)
    assert time.monotonic() - died >= 1.0  # it waited for expiry (not immediate as after a release)
    lease = kube.get("leases", "pool-epp-leader", group="coordination.k8s.io")
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1


async def test_leader_steps_down_when_it_cannot_renew(kube, electors):
    a, _, changes = electors
    await a.start()
    await eventually(lambda: a.is_leader, "a leads")
    kube.forbid("get", "leases")
    await eventually(lambda: not a.is_leader, "a steps down", timeout=TIMING["renew_deadline"] + 5)
    await eventually(lambda: changes["a"] == [True, False], "the step-down delivered")
    assert changes["a"] == [True, False]
