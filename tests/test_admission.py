"""Admission: legacy shedding and flow control (ordering, limits, TTL, cancellation)."""

import asyncio
import time

import pytest

from epp.errors import InferenceError
from epp.flowcontrol.admission import AdmissionController
from epp.framework import Endpoint, InferenceRequest, Metrics
from tests.helpers import DETECTOR_CONFIG, admission_controller, until

DETECTOR = DETECTOR_CONFIG % ""


def flow_config(bands="[]", ttl="60s", max_bytes="10Gi"):
    return DETECTOR + f"featureGates: [flowControl]\nflowControl: {{maxBytes: {max_bytes}, " \
                      f"defaultRequestTTL: {ttl}, priorityBands: {bands}}}\n"


def pool(saturated: bool):
    e = Endpoint("e1", "10.0.0.1", 8000)
    set_saturated(e, saturated)
    return [e]


def set_saturated(e, saturated):
    e.metrics = Metrics(waiting_queue_size=10 if saturated else 0, update_time=time.monotonic(), ok=True)


def req(rid, priority=0, flow="default-flow", size=100):
    return InferenceRequest(rid, "m", "m", "completions", "x", {}, priority=priority, fairness_id=flow,
                            size_bytes=size)


controller = admission_controller


async def test_legacy_sheds_only_sheddable_when_saturated():
    ac = controller(DETECTOR)
    busy, idle = pool(True), pool(False)
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("a", priority=-1), busy)
    assert e.value.http_status == 429
    release = await ac.admit(req("b", priority=0), busy)  # not sheddable: admitted
    assert ac.in_flight == 1
    release()
    release()  # idempotent
    assert ac.in_flight == 0
    (await ac.admit(req("c", priority=-1), idle))()
    assert ac.queue_size == 0


async def test_flow_control_admits_at_once_when_not_saturated():
    ac = controller(flow_config())
    release = await ac.admit(req("a"), pool(False))
    release()
    assert ac.queue_size == 0 and ac._dispatcher is None


async def test_flow_control_orders_bands_then_fcfs_and_stops_polling_when_idle():
    ac = controller(flow_config())
    endpoints = pool(True)
    order = []

    async def one(r):
        release = await ac.admit(r, endpoints)
        order.append(r.request_id)
        release()

    tasks = []
    for r in (req("low1", priority=-1), req("mid1", flow="a"), req("high1", priority=10, flow="x"),
              req("mid2", flow="b"), req("high2", priority=10, flow="y"), req("mid3", flow="a")):
        tasks.append(asyncio.create_task(one(r)))
        n = len(tasks)
        await until(lambda n=n: ac.queue_size == n)
    assert ac.queue_bytes == 600 and ac.band_stats()[10] == (2, 200)
    await asyncio.sleep(0.03)  # still saturated: nothing released
    assert order == []
    set_saturated(endpoints[0], False)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["high1", "high2", "mid1", "mid2", "mid3", "low1"]
    assert ac.queue_size == 0 and ac.queue_bytes == 0 and ac.in_flight == 0
    await until(lambda: ac._dispatcher is None)  # no polling while nothing is queued


async def test_round_robin_policy_alternates_flows():
    ac = controller(flow_config(bands="[{priority: 0, fairnessPolicy: round-robin}]"))
    endpoints = pool(True)
    order = []

    async def one(r):
        (await ac.admit(r, endpoints))()
        order.append(r.request_id)

    tasks = []
    for r in (req("a1", flow="a"), req("a2", flow="a"), req("a3", flow="a"), req("b1", flow="b")):
        tasks.append(asyncio.create_task(one(r)))
        n = len(tasks)
        await until(lambda n=n: ac.queue_size == n)
    set_saturated(endpoints[0], False)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["a1", "b1", "a2", "a3"]


async def test_band_limits_reject_with_429():
    ac = controller(flow_config(bands="[{priority: 0, maxRequests: 2}, {priority: 5, maxBytes: 150}]",
                                max_bytes=1000))
    endpoints = pool(True)
    tasks = [asyncio.create_task(ac.admit(req(f"r{i}"), endpoints)) for i in range(2)]
    await until(lambda: ac.queue_size == 2)
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("r3"), endpoints)
    assert e.value.http_status == 429 and "full" in e.value.message
    tasks.append(asyncio.create_task(ac.admit(req("p1", priority=5), endpoints)))
    await until(lambda: ac.queue_size == 3)
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("p2", priority=5), endpoints)  # 100 + 100 > 150 bytes
    assert e.value.http_status == 429
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("big", priority=7, size=800), endpoints)  # global 300 + 800 > 1000
    assert e.value.http_status == 429
    assert ac.queue_size == 3 and ac.queue_bytes == 300
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert ac.queue_size == 0 and ac.queue_bytes == 0


async def test_ttl_expiry_is_429_and_leaves_queue():
    # The reference answers a queue TTL expiry with 429 rejected-ttl-expired while the pool has
    # endpoints (backpressure), 503 rejected-no-endpoints when it has none:
    # llm-d-router pkg/epp/requestcontrol/admission.go, translateFlowControlOutcome (QueueOutcomeEvictedTTL).
    ac = controller(flow_config(ttl="50ms"))
    outcomes = []
    ac.observe_queue_duration = lambda secs, prio, outcome: outcomes.append(outcome)
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("a"), pool(True))
    assert e.value.http_status == 429 and e.value.reason == "rejected-ttl-expired"
    assert ac.queue_size == 0 and ac.queue_bytes == 0 and ac.band_stats()[0] == (0, 0)
    assert outcomes == ["rejected_ttl"]


async def test_ttl_expiry_without_endpoints_is_503_after_no_endpoint_ttl():
    # noEndpointRequestTTL is the budget of a request whose pool has no endpoint; expiry is 503
    # rejected-no-endpoints (admission.go, QueueOutcomeEvictedNoEndpoints / ttlPoolEmpty).
    ac = controller(DETECTOR + "featureGates: [flowControl]\n"
                    "flowControl: {defaultRequestTTL: 10s, noEndpointRequestTTL: 30ms}\n")
    t0 = time.monotonic()
    with pytest.raises(InferenceError) as e:
        await ac.admit(req("a"), [])
    assert time.monotonic() - t0 < 5  # the 30 ms budget, not defaultRequestTTL's 10 s
    assert e.value.http_status == 503 and e.value.reason == "rejected-no-endpoints"
    assert ac.queue_size == 0


async def test_cancelled_waiter_leaves_no_trace():
    ac = controller(flow_config())
    endpoints = pool(True)
    waiter = asyncio.create_task(ac.admit(req("gone", flow="f"), endpoints))
    keeper = asyncio.create_task(ac.admit(req("stays", flow="f"), endpoints))
    await until(lambda: ac.queue_size == 2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert ac.queue_size == 1 and ac.queue_bytes == 100
    set_saturated(endpoints[0], False)
    release = await asyncio.wait_for(keeper, 5)
    release()
    assert ac.queue_size == 0 and ac.in_flight == 0
    assert not any(b.flows for b in ac.queues.bands.values())  # empty flows are dropped


async def test_close_fails_queued_requests_with_503():
    ac = controller(flow_config())
    t = asyncio.create_task(ac.admit(req("a"), pool(True)))
    await until(lambda: ac.queue_size == 1)
    await ac.close()
    with pytest.raises(InferenceError) as e:
        await t
    assert e.value.http_status == 503 and ac.queue_size == 0


async def test_only_the_saturation_protocol_is_needed():
    """The controller asks its detector for saturation(endpoints) and nothing else."""
    class Fixed:
        def __init__(self, value):
            self.value, self.seen = value, []

        def saturation(self, endpoints):
            self.seen.append(list(endpoints))
            return self.value

    busy = Fixed(1.5)
    with pytest.raises(InferenceError):
        await AdmissionController(busy).admit(req("a", priority=-1), pool(False))
    assert len(busy.seen) == 1 and [e.name for e in busy.seen[0]] == ["e1"]
    (await AdmissionController(None).admit(req("b", priority=-1), pool(True)))()  # no detector: never saturated
