"""In-flight eviction's parts, against the reference's (llm-d-router pkg/epp/flowcontrol/
eviction, controller/internal/reclamation.go and their tests): the victim filter and
ordering, the evictor's bookkeeping, the reclamation controller's sizing and pacing,
the derived confirmation grace, the config key, the metric families, and the dispatcher
evicting for a blocked higher band."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from epp.assembly import load_plugin_set
from epp.config import load_config
from epp.flowcontrol.admission import AdmissionController
from epp.flowcontrol.eviction import (
    CONFIRMATION_TIMEOUT,
    MAX_REVOCATIONS_PER_DECISION,
    EvictionItem,
    EvictionMetrics,
    ReclamationController,
    RequestEvictor,
    build_eviction,
    confirmation_grace,
)
from epp.flowcontrol.eviction_policies import PriorityThenTimeEvictionOrdering, SheddableEvictionFilter
from epp.framework import Endpoint, InferenceRequest
from epp.framework.registry import ALPHA, plugin_class, stability
from tests.test_metrics_reference import EVICTION_FAMILIES, assert_matches_reference, reference


def item(rid: str, priority: int, dispatched: float = 0.0, signals: list | None = None) -> EvictionItem:
    return EvictionItem(rid, priority, dispatched, "10.0.0.1:8000",
                        (lambda reason: signals.append((rid, reason))) if signals is not None else (lambda r: None))


# ------------------------------------------------------------------ the plugins
def test_sheddable_filter_accepts_only_negative_priorities():
    f = SheddableEvictionFilter("f")
    assert [f.accept(item("x", p)) for p in (-5, -1, 0, 1, 10)] == [True, True, False, False, False]


def test_priority_then_time_ordering_matches_the_reference_cases():
    o = PriorityThenTimeEvictionOrdering("o")
    low_old, low_new = item("a", -2, 99.0), item("b", -2, 100.0)
    mid, high = item("c", 0, 100.0), item("d", 5, 100.0)
    assert o.less(low_new, mid) and o.less(mid, high) and not o.less(high, low_old)  # lower priority first
    assert o.less(low_new, low_old) and not o.less(low_old, low_new)  # equal priority: newest dispatch first
    assert not o.less(low_new, item("e", -2, 100.0))  # equal both ways: neither first


@pytest.mark.parametrize("type_name, cls", [("sheddable-eviction-filter", SheddableEvictionFilter),
                                            ("priority-then-time-eviction-order-policy",
                                             PriorityThenTimeEvictionOrdering)])
def test_both_types_are_registered_alpha_without_parameters(type_name, cls):
    assert plugin_class(type_name) is cls and stability(type_name) == ALPHA
    assert "plugins[0].type" in str(_config_error(f"plugins: [{{type: {type_name}}}]"))  # Alpha: needs the flag
    load_config(f"plugins: [{{type: {type_name}}}]")  # no parameters to parse
    assert "takes no parameters" in _config_error(f"plugins: [{{type: {type_name}, parameters: {{x: 1}}}}]")


def _config_error(text: str) -> str:
    from epp.config import ConfigError, check_stability
    try:
        check_stability(load_config(text), allow_experimental_plugins=False)
    except ConfigError as e:
        return str(e)
    return ""


# ------------------------------------------------------------------ the evictor
async def test_evictor_tracks_filters_orders_and_bounds():
    signals: list = []
    ev = RequestEvictor(PriorityThenTimeEvictionOrdering("o"), SheddableEvictionFilter("f"))
    for it in (item("crit", 10, 1.0, signals), item("old", -1, 1.0, signals), item("new", -1, 2.0, signals),
               item("lowest", -3, 0.5, signals)):
        ev.track(it)
    assert ev.stats() == (4, 3) and ev.victim_priority() == -3
    assert ev.evict_n(5, -1) == ["lowest"]  # stops at the first victim not strictly below the bound
    assert ev.stats() == (3, 2)
    assert ev.evict_n(1, 0) == ["new"]  # equal priority: the most recent dispatch goes first
    assert signals == []  # each stream is told on the next loop turn
    await asyncio.sleep(0)
    assert signals == [("lowest", "evicted"), ("new", "evicted")]
    confirmed: list[str] = []
    ev.on_terminated = confirmed.append
    for rid in ("lowest", "lowest", "crit", "new"):  # untrack is idempotent; only evicted ones confirm, once
        ev.untrack(rid)
    assert confirmed == ["lowest", "new"]
    assert ev.stats() == (1, 1) and ev.victim_priority() == -1
    ev.untrack("old")
    assert ev.stats() == (0, 0) and ev.victim_priority() is None and not ev.pending


# ------------------------------------------------------------------ the reclamation controller
class FakeEvictor:
    def __init__(self, in_flight: int, evictable: int, victim: int | None = -1) -> None:
        self.in_flight, self.evictable, self.victim = in_flight, evictable, victim
        self.calls: list[tuple[int, int]] = []
        self.on_terminated = None

    def stats(self) -> tuple[int, int]:
        return self.in_flight, self.evictable

    def victim_priority(self) -> int | None:
        return self.victim

    def evict_n(self, n: int, bound: int) -> list[str]:
        self.calls.append((n, bound))
        return [f"req-{i}" for i in range(n)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def controller(ev: FakeEvictor, clock: Clock | None = None, grace: float = 0.1, timeout: float = 5.0):
    return ReclamationController(ev, None, grace=grace, timeout=timeout, clock=clock or Clock())  # type: ignore[arg-type]


@pytest.mark.parametrize("in_flight, evictable, saturation, ceiling, expected", [
    (6, 6, 1.2, 1.0, [1]),  # credit 0.2, deficit 0.2: one
    (4, 4, 2.0, 1.0, [2]),  # credit 0.5, deficit 1.0: two, the per-decision cap
    (4, 1, 2.0, 1.0, [1]),  # capped by the evictable count
    (6, 6, 0.9, 1.0, []),  # under the ceiling: nothing
    (10, 10, 1.0, 1.0, [1]),  # exactly at the ceiling: still one, or the band stays blocked
    (0, 0, 1.5, 1.0, []),  # nothing in flight
])
def test_sizing_as_the_reference(in_flight, evictable, saturation, ceiling, expected):
    ev = FakeEvictor(in_flight, evictable)
    controller(ev).reclaim(saturation, ceiling, 0)
    assert [n for n, _ in ev.calls] == expected


def test_defaults_are_the_references():
    assert (MAX_REVOCATIONS_PER_DECISION, CONFIRMATION_TIMEOUT) == (2, 10.0)
    rc = ReclamationController(FakeEvictor(1, 1), None, grace=0.5)  # type: ignore[arg-type]
    assert (rc.max_revocations, rc.timeout) == (2, 10.0)
    assert confirmation_grace("concurrency-detector", 0.05, 2.0) == 0.01  # its gauge drops with the stream
    assert confirmation_grace("utilization-detector", 0.05, 2.0) == pytest.approx(2.3)  # refresh + staleness + 250ms
    assert confirmation_grace("", 0.5, 1.0) == pytest.approx(1.75)  # any other detector: conservatively scraped


def test_gate_closes_until_every_revocation_confirms_and_cools():
    clock, ev = Clock(), FakeEvictor(4, 4)
    rc = controller(ev, clock)
    assert rc.gate_open(clock())
    rc.reclaim(2.0, 1.0, 0)
    assert ev.calls == [(2, 0)] and rc.pending_reclaim == pytest.approx(1.0)
    assert not rc.gate_open(clock())
    rc.confirm("req-0")
    assert not rc.gate_open(clock())  # one still outstanding
    rc.confirm("req-1")
    rc.confirm("unknown")  # ignored
    clock.now += 0.05
    assert not rc.gate_open(clock())  # cooling for the grace
    clock.now += 0.06
    assert rc.gate_open(clock()) and rc.pending_reclaim == 0


def test_an_unconfirmed_revocation_times_out_and_a_late_confirmation_is_ignored():
    clock, ev = Clock(), FakeEvictor(4, 4)
    rc = controller(ev, clock)
    rc.reclaim(2.0, 1.0, 0)
    clock.now += 4.9
    assert not rc.gate_open(clock())
    clock.now += 0.1  # the 5 s timeout: treated as confirmed, then cools
    assert not rc.gate_open(clock())
    clock.now += 0.1
    assert rc.gate_open(clock())
    rc.confirm("req-0")
    assert rc.gate_open(clock())


def test_pending_debit_suppresses_a_repeat_decision():
    ev = FakeEvictor(4, 4)
    rc = controller(ev)
    rc.reclaim(2.0, 1.0, 0)
    rc.reclaim(2.0, 1.0, 0)  # the deficit is already debited
    assert ev.calls == [(2, 0)]


@pytest.mark.parametrize("victim, priorities, ceilings, queued, expected", [
    (-1, [10, -1], [1.0, 1.0], {10}, [(1, 10)]),  # blocked band above the victim with queued demand
    (-1, [10, -1], [1.0, 1.0], set(), []),  # nothing queued: nothing to reclaim for
    (10, [10, -1], [1.0, 1.0], {10}, []),  # demand must be strictly above the victim
    (None, [10], [1.0], {10}, []),  # nothing evictable
    (-1, [10], [0.0], {10}, []),  # a zero ceiling never dispatches: not demand
    (-1, [10], [0.9], {10}, [(1, 10)]),  # an attainable ceiling the saturation reached
    (-1, [10, 5], [1.5, 1.0], {10, 5}, [(1, 5)]),  # the first band is not blocked: the next one is the demand
])
def test_maybe_reclaim_demand_rules(victim, priorities, ceilings, queued, expected):
    ev = FakeEvictor(10, 10, victim)
    controller(ev).maybe_reclaim(1.0, 0, priorities, ceilings, queued.__contains__)
    assert ev.calls == expected


def test_gate_closed_skips_the_decision():
    ev = FakeEvictor(10, 10)
    rc = controller(ev)
    rc.maybe_reclaim(1.0, 0, [10], [1.0], lambda p: True)
    rc.maybe_reclaim(1.0, 0, [10], [1.0], lambda p: True)
    assert ev.calls == [(1, 10)]


# ------------------------------------------------------------------ config and metrics
def test_enable_eviction_config_key():
    assert load_config("featureGates: [flowControl]\n").flow_control.enable_eviction is False  # the default
    fc = load_config("featureGates: [flowControl]\nflowControl: {enableEviction: true}\n").flow_control
    assert fc.enable_eviction is True


def test_metric_families_have_the_references_shape():
    registry = CollectorRegistry()
    m = EvictionMetrics(registry, "pool-evict")
    rc = ReclamationController(FakeEvictor(4, 4), m, grace=0.0, clock=Clock())  # type: ignore[arg-type]
    rc.reclaim(2.0, 1.0, 10)
    rc.confirm("req-0")
    rc.gate_open(1000.0 + CONFIRMATION_TIMEOUT)  # req-1 times out
    text = generate_latest(registry).decode()
    assert EVICTION_FAMILIES <= set(reference())
    assert assert_matches_reference(text, EVICTION_FAMILIES) == EVICTION_FAMILIES
    assert 'llm_d_epp_flow_control_revocations_issued_total{inference_pool="pool-evict",priority="10"} 2.0' in text
    assert 'llm_d_epp_flow_control_revocations_total{inference_pool="pool-evict",outcome="confirmed"} 1.0' in text
    assert 'llm_d_epp_flow_control_revocations_total{inference_pool="pool-evict",outcome="timed_out"} 1.0' in text
    assert 'llm_d_epp_flow_control_reclaim_target{inference_pool="pool-evict"} 1.0' in text


# ------------------------------------------------------------------ the dispatcher
class Load:
    """A saturation detector: the running count over a capacity of 1."""

    def __init__(self) -> None:
        self.running = 0

    def saturation(self, endpoints) -> float:
        return float(self.running)


async def test_dispatcher_evicts_a_sheddable_request_for_a_blocked_critical_one():
    text = "featureGates: [flowControl]\nflowControl: {enableEviction: true}\n"
    p = load_plugin_set(text)
    evictor, reclamation = build_eviction(None, 0.05, 2.0, None)
    reclamation.grace = 0.01
    load = Load()
    admission = AdmissionController(load, policies=p.plugins, flow_control=p.flow_control, reclamation=reclamation,
                                    poll_interval=0.005)
    endpoints = [Endpoint("e1", "10.0.0.1", 8000)]
    evicted: list[str] = []

    def signal(reason: str) -> None:  # what the stream does: end the request, which frees its load
        evicted.append(reason)
        load.running -= 1
        evictor.untrack("batch-1")

    release_batch = await admission.admit(req("batch-1", -1), endpoints)
    load.running += 1
    evictor.track(EvictionItem("batch-1", -1, 0.0, "10.0.0.1:8000", signal))
    # saturated (1.0 >= the static ceiling 1.0): the critical request queues, the dispatcher evicts
    release_critical = await asyncio.wait_for(admission.admit(req("crit-1", 10), endpoints), 5)
    assert evicted == ["evicted"]
    assert not reclamation.outstanding  # confirmed by the stream's end
    release_batch()
    release_critical()
    await admission.close()


async def test_dispatcher_without_eviction_keeps_the_critical_request_queued():
    p = load_plugin_set("featureGates: [flowControl]\n")
    load = Load()
    load.running = 1
    admission = AdmissionController(load, policies=p.plugins, flow_control=p.flow_control, poll_interval=0.005)
    waiting = asyncio.ensure_future(admission.admit(req("crit-1", 10), [Endpoint("e1", "10.0.0.1", 8000)]))
    await asyncio.sleep(0.05)  # several dispatch cycles: nothing frees the pool
    assert not waiting.done() and admission.queue_size == 1
    waiting.cancel()
    await admission.close()


def req(rid: str, priority: int) -> InferenceRequest:
    return InferenceRequest(rid, "m", "m", "completions", "x", {}, priority=priority)
