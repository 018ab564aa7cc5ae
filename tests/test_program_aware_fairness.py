"""program-aware-fairness against the reference (llm-d-router pkg/epp/framework/plugins/flowcontrol/
fairness/program-aware: plugin.go's Config defaults and checks, strategy_las.go's score and
decay, programmetrics.go's wait mean, the eviction sweep, prometheus.go's series)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from epp.assembly import load_plugin_set
from epp.flowcontrol.fairness import ProgramAwareParams, jain_index
from epp.framework import InferenceRequest, PluginHandle, ResponseInfo
from tests.helpers import Clock


@dataclass
class Head:
    request: InferenceRequest
    enqueued: float


@dataclass
class Queue:
    waiting: list[Head] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.waiting)

    def head(self) -> Head:
        return self.waiting[0]


def req(program: str, rid: str = "r") -> InferenceRequest:
    return InferenceRequest(rid, "m", "m", "completions", "x", {}, fairness_id=program)


def policy(clock: Clock, **params):
    from epp.flowcontrol.fairness import ProgramAwareFairness

    return ProgramAwareFairness("pa", ProgramAwareParams(**params), PluginHandle(clock=clock, rng=random.Random(1)))


def serve(p, program: str, prompt: int, completion: int, rid: str = "r") -> None:
    """One request of `program` dispatched and completed with this usage."""
    p.pre_request(None, req(program, rid), None)
    p.response_complete(req(program, rid), ResponseInfo(prompt_tokens=prompt, completion_tokens=completion), None)


def test_defaults_are_the_references():
    d = ProgramAwareParams()
    assert (d.strategy, d.lasWeightService, d.lasWeightHeadWait, d.lasHalfLifeSeconds, d.evictionTtlSeconds,
            d.evictionSweepSeconds) == ("las", 0.8, 0.2, 60.0, 3600.0, 300.0)


def test_least_attained_service_wins_and_service_is_prompt_plus_twice_completion():
    clock = Clock()
    p = policy(clock)
    serve(p, "a", prompt=100, completion=50)  # 100 + 2 x 50
    serve(p, "b", prompt=10, completion=5)
    assert p.programs["a"].service == 200 and p.programs["b"].service == 20
    flows = {"a": Queue([Head(req("a"), clock.now - 5)]), "b": Queue([Head(req("b"), clock.now)])}
    # a waited longer (0.2 x 1) but b has the least service (0.8 x 1): b
    assert p.pick_flow(flows, None) == "b"


def test_equal_service_goes_to_the_longest_waiting_head():
    clock = Clock()
    p = policy(clock)
    flows = {"a": Queue([Head(req("a"), clock.now - 0.2)]), "b": Queue([Head(req("b"), clock.now - 0.9)]),
             "c": Queue()}  # an empty flow is not a candidate
    assert all(p.pick_flow(flows, None) == "b" for _ in range(10))
    assert p.pick_flow({"c": Queue()}, None) is None


def test_attained_service_halves_every_half_life_and_zero_disables_decay():
    clock = Clock()
    p, flat = policy(clock, lasHalfLifeSeconds=10), policy(clock, lasHalfLifeSeconds=0)
    for x in (p, flat):
        serve(x, "a", prompt=400, completion=0)
    clock.now += 20
    assert p.service(p.programs["a"], clock.now) == pytest.approx(100.0)
    assert flat.service(flat.programs["a"], clock.now) == 400.0


def test_queue_wait_mean_is_kept_per_program_and_fairness_index():
    clock = Clock()
    p = policy(clock)
    for wait in (0.0105, 0.0305):  # whole milliseconds: 10 and 30
        flows = {"a": Queue([Head(req("a", "r1"), clock.now - wait)])}
        assert p.pick_flow(flows, None) == "a"
        p.pre_request(None, req("a", "r1"), None)
    assert p.programs["a"].avg_wait_ms == pytest.approx(20.0) and p.programs["a"].in_flight == 2
    p.pre_request(None, req("b", "straight-through"), None)  # admitted without queueing: no wait observed
    assert p.programs["b"].waits == 0 and p.programs["b"].dispatched == 1
    assert p.fairness_index() == 1.0  # one program with waits
    assert p.pick_flow({"c": Queue([Head(req("c", "r2"), clock.now - 0.0605)])}, None) == "c"
    p.pre_request(None, req("c", "r2"), None)
    assert p.fairness_index() == pytest.approx((20 + 60) ** 2 / (2 * (20 ** 2 + 60 ** 2)))  # 0.8
    assert jain_index([10.0, 30.0]) == pytest.approx(40 ** 2 / (2 * 1000)) and jain_index([5.0]) == 1.0


def test_idle_programs_are_evicted_by_the_sweep_unless_in_flight():
    clock = Clock()
    p = policy(clock, evictionTtlSeconds=100, evictionSweepSeconds=10)
    serve(p, "idle", 1, 1)
    p.pre_request(None, req("busy"), None)  # in flight, never completes
    clock.now += 101
    p.pick_flow({}, None)  # the sweep runs from the dispatch loop
    assert set(p.programs) == {"busy"}


def test_metrics_series():
    clock = Clock()
    handle = PluginHandle(clock=clock)
    from epp.flowcontrol.fairness import ProgramAwareFairness

    p = ProgramAwareFairness("pa", ProgramAwareParams(), handle)
    serve(p, "tenant-a", 3, 2)
    text = generate_latest(handle.metrics.registry).decode()
    assert "llm_d_epp_program_aware_jains_fairness_index 1.0" in text
    assert 'llm_d_epp_program_aware_attained_service_tokens{program_id="tenant-a"} 7.0' in text
    assert 'llm_d_epp_program_aware_avg_wait_time_milliseconds{program_id="tenant-a"} 0.0' in text


def test_the_references_sample_config_loads_with_the_policy_on_the_default_band():
    text = (Path(__file__).parent / "fixtures" / "reference" / "configs" / "sim-program-aware-config.yaml").read_text()
    ps = load_plugin_set(text)
    assert ps.flow_control.default_band.fairness_policy_ref == "program-aware-fairness"
    assert "PreRequest" in __import__("epp.framework", fromlist=["x"]).extension_points(
        ps.plugins["program-aware-fairness"])
