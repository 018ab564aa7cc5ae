"""Flow-control policy plugins against the reference's semantics
(llm-d-router pkg/epp/framework/plugins/flowcontrol/...): fairness (global_strict.go,
roundrobin.go), ordering (fcfs.go, edf.go, slo_deadline.go), usage limits
(usagelimits/usagelimitpolicy.go), wired into the queues by the config's references."""

import asyncio
import math
import time

import pytest

from epp.assembly import load_plugin_set
from epp.errors import InferenceError
from epp.flowcontrol.admission import AdmissionController
from epp.flowcontrol.fairness import GlobalStrictFairnessPolicy, RoundRobinFairnessPolicy
from epp.flowcontrol.ordering import EDFOrderingPolicy, FCFSOrderingPolicy, SLODeadlineOrderingPolicy
from epp.flowcontrol.usagelimits import StaticUsageLimitPolicy
from epp.framework import Endpoint, InferenceRequest, Metrics, PluginHandle
from epp.framework.registry import plugin_class
from tests.helpers import DETECTOR_CONFIG, admission_controller, until


class Item:
    def __init__(self, enqueued, ttl=0.0, headers=None):
        self.enqueued, self.ttl, self.headers = enqueued, ttl, headers or {}


class Flow:
    def __init__(self, *keys):
        self.keys = list(keys)

    def __len__(self):
        return len(self.keys)

    def head_key(self):
        return self.keys[0]


def test_registered_types_and_parameter_defaults():
    for t in ("global-strict-fairness-policy", "round-robin-fairness-policy", "fcfs-ordering-policy",
              "edf-ordering-policy", "slo-deadline-ordering-policy", "static-usage-limit-policy"):
        assert plugin_class(t).type_name == t
    assert StaticUsageLimitPolicy("s", None, PluginHandle()).threshold == 1.0  # usagelimitpolicy.go: 1.0
    assert StaticUsageLimitPolicy("s", None, PluginHandle()).compute_limit(0.3, [5, 0, -1]) == [1.0, 1.0, 1.0]


def test_fcfs_orders_by_enqueue_time():
    p = FCFSOrderingPolicy("o")
    assert sorted([Item(3.0), Item(1.0), Item(2.0)], key=p.order_key)[0].enqueued == 1.0


def test_edf_earliest_deadline_first_no_ttl_last_ties_by_enqueue():
    p = EDFOrderingPolicy("o")
    items = [Item(0.0, ttl=10.0), Item(1.0, ttl=2.0), Item(0.5, ttl=0.0), Item(2.0, ttl=1.0)]
    assert [(i.enqueued, i.ttl) for i in sorted(items, key=p.order_key)] == [
        (1.0, 2.0), (2.0, 1.0), (0.0, 10.0), (0.5, 0.0)]  # deadlines 3, 3 (tie: earlier enqueue), 10, none
    assert p.order_key(Item(5.0))[0] == math.inf


def test_slo_deadline_reads_the_ttft_header():
    p = SLODeadlineOrderingPolicy("o")
    urgent = Item(1.0, headers={"x-llm-d-slo-ttft-ms": "100"})
    relaxed = Item(0.0, headers={"x-llm-d-slo-ttft-ms": "5000"})
    none = Item(0.0)
    bad = [Item(0.0, headers={"x-llm-d-slo-ttft-ms": v}) for v in ("-5", "abc", "1.5", "", str(2**63))]
    assert sorted([none, relaxed, urgent], key=p.order_key) == [urgent, relaxed, none]
    assert all(p.order_key(b)[0] == math.inf for b in bad)  # unparsable / negative / overflow: no deadline


def test_global_strict_picks_the_earliest_head_across_flows():
    p = GlobalStrictFairnessPolicy("f")
    assert p.pick_flow({"a": Flow((3.0, 0)), "b": Flow((1.0, 1)), "c": Flow()}, p.new_state()) == "b"
    assert p.pick_flow({"c": Flow()}, None) is None


def test_round_robin_turns_in_sorted_id_order_and_survives_a_flow_leaving():
    p = RoundRobinFairnessPolicy("f")
    state = p.new_state()
    flows = {"b": Flow((0,)), "a": Flow((0,)), "c": Flow((0,))}
    assert [p.pick_flow(flows, state) for _ in range(4)] == ["a", "b", "c", "a"]
    del flows["b"]  # b left after a was picked: next is c, as if b were still there and empty
    assert p.pick_flow(flows, state) == "c"
    assert p.pick_flow({}, state) is None and state.last is None


# --------------------------------------------------------------------------- through the admission controller
BASE = DETECTOR_CONFIG + "featureGates: [flowControl]\n"


def controller(extra, plugins="", pool=None):
    """An admission controller over BASE + extra; `pool` is the live pool the dispatcher samples."""
    return admission_controller(BASE % plugins + extra, pool)


def endpoint(queue):
    e = Endpoint("e1", "10.0.0.1", 8000)
    e.metrics = Metrics(waiting_queue_size=queue, update_time=time.monotonic(), ok=True)
    return e


def req(rid, flow="f", priority=0, headers=None):
    return InferenceRequest(rid, "m", "m", "completions", "x", headers or {}, priority=priority, fairness_id=flow,
                            size_bytes=10)


async def run_queued(ac, e, requests, release_queue=0):
    order = []

    async def one(r):
        (await ac.admit(r, [e]))()
        order.append(r.request_id)

    tasks = []
    for r in requests:
        tasks.append(asyncio.create_task(one(r)))
        n = len(tasks)
        await until(lambda n=n: ac.queue_size == n)
    e.metrics = Metrics(waiting_queue_size=release_queue, update_time=time.monotonic(), ok=True)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    return order


async def test_band_refs_select_round_robin_and_slo_deadline():
    ac = controller("flowControl: {priorityBands: [{priority: 0, fairnessPolicyRef: round-robin-fairness-policy, "
                    "orderingPolicyRef: slo-deadline-ordering-policy}]}\n")
    slo = {"x-llm-d-slo-ttft-ms": "50"}
    order = await run_queued(ac, endpoint(10), [req("a1", "a"), req("a2", "a", headers=slo), req("a3", "a"),
                                                req("b1", "b"), req("b2", "b")])
    # flows a, b in turn; within a, the request with a TTFT SLO first, then arrival order
    assert order == ["a2", "b1", "a1", "b2", "a3"]


async def test_usage_limit_threshold_holds_the_band_below_saturation():
    ac = controller("flowControl: {usageLimitPolicyPluginRef: half}\n",
                    "- {type: static-usage-limit-policy, name: half, parameters: {threshold: 0.5}}")
    e = endpoint(3)  # saturation 3/5 = 0.6: under 1.0 but at/over the 0.5 ceiling
    t = asyncio.create_task(ac.admit(req("a"), [e]))
    await until(lambda: ac.queue_size == 1)
    await asyncio.sleep(0.03)
    assert ac.queue_size == 1 and not t.done()  # held: saturation >= threshold
    e.metrics = Metrics(waiting_queue_size=2, update_time=time.monotonic(), ok=True)  # 0.4 < 0.5
    (await asyncio.wait_for(t, 5))()
    assert ac.queue_size == 0


async def test_global_max_requests_rejects_429_and_503_without_endpoints():
    ac = controller("flowControl: {maxRequests: 2}\n")
    e = endpoint(10)
    tasks = [asyncio.create_task(ac.admit(req(f"r{i}", priority=i), [e])) for i in range(2)]  # two bands
    await until(lambda: ac.queue_size == 2)
    with pytest.raises(InferenceError) as err:
        await ac.admit(req("r3", priority=7), [e])
    assert err.value.http_status == 429 and err.value.reason == "rejected-saturated"
    assert "2 requests" in err.value.message
    with pytest.raises(InferenceError) as err:
        await ac.admit(req("r4"), [])  # the pool has no endpoint: unavailability (processor.go)
    assert err.value.http_status == 503 and err.value.reason == "rejected-no-endpoints"
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert ac.queue_size == 0


async def test_band_default_max_requests_is_5000():
    ac = controller("flowControl: {}\n")
    assert ac.queues.config.band(0).max_requests == 5000


# --------------------------------------------------------------------------- Alpha usage-limit policies
def holdback(**params):
    from epp.flowcontrol.usagelimits import PriorityHoldbackParams, PriorityHoldbackPolicy
    return PriorityHoldbackPolicy("h", PriorityHoldbackParams(**params), PluginHandle())


def test_priority_holdback_rank_and_value_domains():
    # priority_holdback.go: rank = evenly spread by position, value = proportional to the priority
    assert holdback(minCeiling=0.4).compute_limit(0.9, [10, 5, 0, -10]) == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert holdback(minCeiling=0.4, domain="value").compute_limit(0.9, [10, 5, 0, -10]) == pytest.approx(
        [1.0, 0.85, 0.7, 0.4])
    assert holdback(minCeiling=0.2, maxCeiling=0.9).compute_limit(0.0, [3]) == [0.9]  # one band: maxCeiling
    assert holdback(minCeiling=0.2, domain="value").compute_limit(0.0, [3, 3]) == [1.0, 1.0]


def test_soft_reflective_ceiling_opens_lower_bands_as_the_reference():
    from epp.flowcontrol.usagelimits import SoftReflectiveCeilingPolicy
    p = SoftReflectiveCeilingPolicy("s")
    assert p.compute_limit(0.2, [2, 1, 0]) == [1.0, 1.0, 1.0]  # 0.2 < 1 - i*0.2/2 for every band
    assert p.compute_limit(1.0, [2, 1, 0]) == [1.0, 0.0, 0.0]  # saturated: only the top band
    # s = 0.75: band 1's reflective ceiling 0.625 <= s -> alternating, open one cycle in round(0.75/0.25) = 3
    opened = [p.compute_limit(0.75, [1, 0])[1] for _ in range(6)]
    assert opened == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert p.compute_limit(0.4, [1, 0]) == [1.0, 1.0]  # 0.4 < 1 - 0.4: open


async def test_priority_holdback_holds_the_lower_band_before_saturation():
    ac = controller("flowControl:\n  usageLimitPolicyPluginRef: hold\n"
                    "  priorityBands: [{priority: 10}, {priority: 0}]\n",
                    "- {type: priority-holdback-policy, name: hold, parameters: {minCeiling: 0.5}}")
    e = endpoint(3)  # saturation 0.6: band 10's ceiling 1.0 lets it through, band 0's 0.5 holds it
    low = asyncio.create_task(ac.admit(req("low", priority=0), [e]))
    await until(lambda: ac.queue_size == 1)
    (await asyncio.wait_for(ac.admit(req("high", priority=10), [e]), 5))()  # at once
    await asyncio.sleep(0.03)
    assert not low.done() and ac.queue_size == 1
    e.metrics = Metrics(waiting_queue_size=2, update_time=time.monotonic(), ok=True)  # 0.4 < 0.5
    (await asyncio.wait_for(low, 5))()


async def test_a_request_queued_while_the_pool_is_empty_is_dispatched_when_an_endpoint_appears():
    """Scale from zero: the dispatcher samples the live pool (the reference's Locate(nil)),
    not the empty snapshot the request was admitted with; the live pool also decides
    whether a TTL expiry is 429 (endpoints exist) or 503 (none)."""
    live: list[Endpoint] = []
    ac = controller("flowControl: {defaultRequestTTL: 100ms, noEndpointRequestTTL: 10s}\n", pool=lambda: live)
    waiting = asyncio.create_task(ac.admit(req("cold"), []))
    await until(lambda: ac.queue_size == 1)
    await asyncio.sleep(0.03)
    assert not waiting.done()  # no endpoint: saturation 1.0, and the 10 s budget, not 100 ms
    live.append(endpoint(0))
    (await asyncio.wait_for(waiting, 5))()
    live[0].metrics = Metrics(waiting_queue_size=10, update_time=time.monotonic(), ok=True)
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("busy"), live)
    assert e.value.http_status == 429 and e.value.reason == "rejected-ttl-expired"


async def test_a_regime_change_starts_the_other_budget():
    """processor.go isExpired: defaultRequestTTL while the pool has endpoints, noEndpointRequestTTL
    while it has none, charged from the later of enqueue and the last regime change."""
    live: list[Endpoint] = []
    ac = controller("flowControl: {defaultRequestTTL: 100ms, noEndpointRequestTTL: 10s}\n", pool=lambda: live)
    waiting = asyncio.create_task(ac.admit(req("cold"), []))
    await until(lambda: ac.queue_size == 1)
    await asyncio.sleep(0.2)
    assert not waiting.done()  # 0.2 s > defaultRequestTTL, but the pool is empty: the 10 s budget
    t0 = time.monotonic()
    live.append(endpoint(10))  # an endpoint appears, saturated: now the 100 ms budget, from the change
    with pytest.raises(InferenceError) as e:
        await asyncio.wait_for(waiting, 5)
    assert e.value.http_status == 429 and e.value.reason == "rejected-ttl-expired"
    assert 0.05 < time.monotonic() - t0 < 2.0
    assert ac.queue_size == 0

    live.clear()
    q = load_plugin_set(BASE % "" + "flowControl: {noEndpointRequestTTL: 50ms}\n", PluginHandle())
    empty = AdmissionController(q.saturation_detector, flow_control=q.flow_control, policies=q.plugins,
                                pool=lambda: live, poll_interval=0.005)
    with pytest.raises(InferenceError) as e:
        await asyncio.wait_for(empty.admit(req("nothing"), []), 5)
    assert e.value.http_status == 503 and e.value.reason == "rejected-no-endpoints"
