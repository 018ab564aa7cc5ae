"""Filters and the utilization detector."""

import random

import pytest

from epp.assembly import build_plugin
from epp.framework import CycleState, Endpoint, InferenceRequest, Metrics, PluginHandle, ResponseInfo
from epp.framework.datakeys import PREFIX_MATCH_INFO, PrefixCacheMatchInfo
from filters.conformance import parse_selection


def ep(i, labels=None, addr=None, port=8000, **metrics):
    return Endpoint(f"e{i}", addr or f"10.0.0.{i}", port, labels=labels or {}, metrics=Metrics(**metrics))


def req(headers=None):
    return InferenceRequest("r", "m", "m", "completions", "x" * 100, headers or {})


def plugin(ptype, params=None, clock=None, seed=3):
    h = PluginHandle(rng=random.Random(seed))
    if clock is not None:
        h.clock = clock
    return build_plugin(ptype, None, params, h, "test")


def run(f, eps, headers=None, cycle=None):
    return f.filter(cycle if cycle is not None else CycleState(), req(headers), eps)


def test_selection_header_parsing():
    ips, pairs = parse_selection("10.0.0.1, 10.0.0.2:8001,[fd00::1]:9000,fd00::2,[fd00::3], ")
    assert ips == {"10.0.0.1", "fd00::2", "fd00::3"}
    assert pairs == {("10.0.0.2", 8001), ("fd00::1", 9000)}


def test_header_based_testing_filter():
    f = plugin("header-based-testing-filter")
    eps = [ep(1), ep(2), ep(3, port=8001), ep(4, addr="fd00::1")]
    assert run(f, eps) == []  # header missing: nothing
    assert run(f, eps, {"test-epp-endpoint-selection": "10.0.0.1,10.0.0.3:8001"}) == [eps[0], eps[2]]
    assert run(f, eps, {"test-epp-endpoint-selection": "10.0.0.3:9999"}) == []
    assert run(f, eps, {"test-epp-endpoint-selection": "[fd00::1]:8000"}) == [eps[3]]
    assert run(f, eps, {"test-epp-endpoint-selection": "fd00::1"}) == [eps[3]]


def test_destination_endpoint_served_verifier():
    v = plugin("destination-endpoint-served-verifier")
    info = ResponseInfo(served_endpoint="10.0.0.9:8000")
    v.response_received(req(), info, ep(1))
    assert info.set_headers == {"x-conformance-test-served-endpoint": "10.0.0.9:8000"}
    info = ResponseInfo()
    v.response_received(req(), info, ep(1))
    assert info.set_headers["x-conformance-test-served-endpoint"] == "10.0.0.1:8000"


def test_label_selector_filter():
    eps = [ep(1, {"tier": "gold", "zone": "a"}), ep(2, {"tier": "silver", "zone": "b"}), ep(3, {"tier": "gold"})]
    f = plugin("label-selector-filter", {"matchLabels": {"tier": "gold"}})
    assert run(f, eps) == [eps[0], eps[2]]
    f = plugin("label-selector-filter", {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]})
    assert run(f, eps) == [eps[0], eps[1]]
    f = plugin("label-selector-filter", {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]})
    assert run(f, eps) == [eps[1], eps[2]]
    f = plugin("label-selector-filter", {"matchExpressions": [{"key": "zone", "operator": "Exists"}]})
    assert run(f, eps) == [eps[0], eps[1]]
    f = plugin("label-selector-filter", {"matchLabels": {"tier": "gold"},
                                         "matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]})
    assert run(f, eps) == [eps[2]]
    assert run(plugin("label-selector-filter"), eps) == eps  # empty selector matches everything


def test_role_filters():
    role = "llm-d.ai/role"
    eps = [ep(1, {role: "prefill"}), ep(2, {role: "decode"}), ep(3, {role: "prefill-decode"}),
           ep(4, {role: "both"}), ep(5)]
    assert run(plugin("decode-filter"), eps) == [eps[1], eps[2], eps[3], eps[4]]
    assert run(plugin("prefill-filter"), eps) == [eps[0], eps[2], eps[3]]


def test_prefix_cache_affinity_filter():
    eps = [ep(1), ep(2), ep(3)]
    m = PrefixCacheMatchInfo({eps[0]: 9, eps[1]: 8, eps[2]: 2}, total_blocks=10, block_size_tokens=16, longest=9)
    cycle = CycleState()
    cycle.write(PREFIX_MATCH_INFO, m)
    f = plugin("prefix-cache-affinity-filter", {"explorationProbability": 0.0})
    assert run(f, eps, cycle=cycle) == [eps[0], eps[1]]  # 0.9, 0.8 >= 0.80
    f = plugin("prefix-cache-affinity-filter", {"explorationProbability": 0.0, "affinityThreshold": 0.95})
    assert run(f, eps, cycle=cycle) == eps  # none pass: keep all
    f = plugin("prefix-cache-affinity-filter", {"explorationProbability": 1.0})
    assert run(f, eps, cycle=cycle) == eps  # always explores
    f = plugin("prefix-cache-affinity-filter", {"explorationProbability": 0.5}, seed=11)
    kept_all = sum(len(run(f, eps, cycle=cycle)) == 3 for _ in range(1000))
    assert 400 < kept_all < 600
    assert run(plugin("prefix-cache-affinity-filter"), eps) == eps  # no prefix state
    other = plugin("prefix-cache-affinity-filter", {"explorationProbability": 0.0,
                                                    "prefixMatchInfoProducerName": "other-producer"})
    assert run(other, eps, cycle=cycle) == eps  # reads only the producer it names
    cycle.write(PREFIX_MATCH_INFO.of("other-producer"), m)
    assert run(other, eps, cycle=cycle) == [eps[0], eps[1]]


def test_utilization_detector_filter_and_saturation():
    now = [1000.0]
    d = plugin("utilization-detector", clock=lambda: now[0])
    fresh = now[0] - 0.1
    eps = [ep(1, waiting_queue_size=0, kv_cache_usage_percent=0.4, update_time=fresh),
           ep(2, waiting_queue_size=5, kv_cache_usage_percent=0.1, update_time=fresh),  # queue at threshold
           ep(3, waiting_queue_size=1, kv_cache_usage_percent=0.8, update_time=fresh),  # kv at threshold
           ep(4, waiting_queue_size=0, kv_cache_usage_percent=0.0, update_time=now[0] - 0.3)]  # stale
    assert run(d, eps) == [eps[0]]
    # saturation = mean of max(q/5, kv/0.8), stale -> 1.0
    assert d.saturation(eps) == pytest.approx((0.5 + 1.0 + 1.0 + 1.0) / 4)
    assert d.saturation([ep(9)]) == 1.0  # never scraped
    assert d.saturation([]) == 1.0
    busy = [ep(1, waiting_queue_size=9, update_time=fresh)]
    assert run(d, busy) == busy  # none pass: keep all
    h = plugin("utilization-detector", {"headroom": 0.5, "metricsStalenessThreshold": "1s"}, clock=lambda: now[0])
    assert run(h, eps) == eps[:4]  # 5 < 7.5, 0.8 < 1.2, 0.3 s old is fresh under 1s
