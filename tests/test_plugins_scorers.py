"""Scorer formulas at their boundaries (reference scheduling.md)."""

import base64

import pytest

from epp.framework import (
    CycleState,
    InferenceRequest,
    ResponseInfo,
)
from epp.framework.datakeys import (
    INFLIGHT_LOAD,
    PREFIX_MATCH_INFO,
    TOKENIZED_PROMPT,
    InFlightLoadInfo,
    PrefixCacheMatchInfo,
)
from tests import helpers
from tests.helpers import plugin, result


def ep(i, labels=None, **metrics):
    return helpers.ep(i, labels, namespace="ns", **metrics)


def req(model="m", prompt="x" * 400, rid="r", headers=None, max_tokens=None):
    return InferenceRequest(rid, model, model, "completions", prompt, headers or {}, max_tokens=max_tokens)


def score(p, endpoints, request=None, cycle=None):
    return p.score(cycle if cycle is not None else CycleState(), request or req(), endpoints)


def test_queue_and_running_scorers_min_max():
    eps = [ep(1, waiting_queue_size=10, running_requests_size=3), ep(2, waiting_queue_size=0, running_requests_size=3),
           ep(3, waiting_queue_size=5, running_requests_size=9)]
    assert score(plugin("queue-scorer"), eps) == [0.0, 1.0, 0.5]
    assert score(plugin("running-requests-size-scorer"), eps) == [1.0, 1.0, 0.0]
    same = [ep(1, waiting_queue_size=4), ep(2, waiting_queue_size=4)]
    assert score(plugin("queue-scorer"), same) == [1.0, 1.0]
    assert score(plugin("queue-scorer"), []) == []


def test_kv_cache_utilization():
    assert score(plugin("kv-cache-utilization-scorer"),
                 [ep(1, kv_cache_usage_percent=0.0), ep(2, kv_cache_usage_percent=0.75),
                  ep(3, kv_cache_usage_percent=1.0)]) == [1.0, 0.25, 0.0]


def test_lora_affinity_levels():
    running = frozenset({"a"})
    eps = [
        ep(1, running_lora_adapters=running, max_active_models=1),  # running: 1.0
        ep(2, running_lora_adapters=frozenset({"b"}), max_active_models=4),  # room: 0.8
        ep(3, running_lora_adapters=frozenset({"b"}), waiting_lora_adapters=frozenset({"a"}),
           max_active_models=2),  # full, waiting: 0.6
        ep(4, running_lora_adapters=frozenset({"b", "c"}), max_active_models=2),  # full: 0
    ]
    assert score(plugin("lora-affinity-scorer"), eps, req(model="a")) == [1.0, 0.8, 0.6, 0.0]


def test_token_load():
    """Reference: scheduling/scorer/tokenload/token_load.go (tokens in flight + this
    request's uncached tokens, from the in-flight load producer)."""
    eps = [ep(i) for i in range(3)]
    cycle = CycleState()
    cycle.write(INFLIGHT_LOAD, InFlightLoadInfo(tokens={eps[1]: 200, eps[2]: 5000}, uncached={eps[1]: 50}))
    assert score(plugin("token-load-scorer", {"queueThresholdTokens": 1000}), eps, cycle=cycle) == [1.0, 0.75, 0.0]
    assert plugin("token-load-scorer").threshold == 4194304
    assert plugin("token-load-scorer", {"queueThresholdTokens": 0}).threshold == 4194304  # <= 0: the default
    assert score(plugin("token-load-scorer"), eps) == [1.0, 1.0, 1.0]  # no producer ran: no load


def test_load_aware():
    eps = [ep(1, waiting_queue_size=0), ep(2, waiting_queue_size=32), ep(3, waiting_queue_size=500)]
    assert score(plugin("load-aware-scorer"), eps) == [0.5, 0.5 * (1 - 32 / 128), 0.0]
    assert score(plugin("load-aware-scorer", {"threshold": 64}), eps)[1] == pytest.approx(0.25)
    assert plugin("load-aware-scorer", {"threshold": 0}).threshold == 128  # <= 0: the default, as the reference


class _Load:
    """An inflight-load-producer and a consumer scorer, run as one cycle runs them."""

    def __init__(self, scorer):
        self.producer, self.scorer = plugin("inflight-load-producer"), scorer

    def commit(self, rid, e):
        cycle = CycleState()
        self.producer.prepare_request_data(cycle, req(rid=rid), [e])
        self.producer.pre_request(cycle, req(rid=rid), result(e))

    def complete(self, rid, e):
        self.producer.response_complete(req(rid=rid), ResponseInfo(), e)

    def score(self, eps):
        cycle = CycleState()
        self.producer.prepare_request_data(cycle, req(), eps)
        return score(self.scorer, eps, cycle=cycle)


def test_active_request_counts_and_formula():
    """Reference: scheduling/scorer/activerequest/active_request.go, counts from
    requestcontrol/dataproducer/inflightload/producer.go."""
    eps = [ep(1), ep(2), ep(3)]
    p = _Load(plugin("active-request-scorer", {"requestTimeout": "10s"}))  # deprecated: ignored
    assert p.score(eps) == [1.0, 1.0, 1.0]
    for i in range(4):
        p.commit(f"a{i}", eps[0])
    for i in range(2):
        p.commit(f"b{i}", eps[1])
    assert p.score(eps) == [0.0, 0.5, 1.0]  # (4-c)/4, idle (0) -> 1.0
    p.complete("a0", eps[0])
    p.complete("a0", eps[0])  # twice: counted once
    assert p.producer.requests[eps[0]] == 3
    p2 = _Load(plugin("active-request-scorer", {"idleThreshold": 2, "maxBusyScore": 0.5}))
    for i in range(4):
        p2.commit(f"a{i}", eps[0])
    p2.commit("b", eps[1])
    assert p2.score(eps) == [0.0, 1.0, 1.0]
    p2.commit("c", eps[1])
    p2.commit("d", eps[1])
    assert p2.score(eps) == [0.0, pytest.approx((4 - 3) / 4 * 0.5), 1.0]
    # Out-of-range values fall back as the reference's do (with a warning), not refused.
    lenient = plugin("active-request-scorer", {"idleThreshold": -1, "maxBusyScore": 2.0})
    assert (lenient.idle, lenient.max_busy) == (0, 1.0)


def test_session_affinity():
    p = plugin("session-affinity-scorer")
    eps = [ep(1), ep(2)]
    token = base64.standard_b64encode(b"ns/e2").decode()
    assert score(p, eps, req(headers={"x-session-token": token})) == [0.0, 1.0]
    assert score(p, eps, req(headers={"x-session-token": "!!notbase64"})) == [0.0, 0.0]
    assert score(p, eps, req()) == [0.0, 0.0]
    info = ResponseInfo()
    p.response_received(req(), info, eps[0])
    assert base64.standard_b64decode(info.set_headers["x-session-token"]) == b"ns/e1"


def test_no_hit_lru_spreads_cold_requests():
    """Reference: scheduling/scorer/nohitlru/no_hit_lru.go (rank r of n scores 1 - r/(n-1);
    never-used first in candidate order, then least recently used first)."""
    p = plugin("no-hit-lru-scorer")
    eps = [ep(1), ep(2), ep(3)]
    cold, warm = CycleState(), CycleState()
    cold.write(PREFIX_MATCH_INFO, PrefixCacheMatchInfo({}, total_blocks=2, block_size_tokens=16, longest=0))
    warm.write(PREFIX_MATCH_INFO, PrefixCacheMatchInfo({eps[0]: 1}, total_blocks=2, block_size_tokens=16,
                                                       longest=1))
    assert score(p, eps, cycle=cold) == [1.0, 0.5, 0.0]  # all never used: candidate order
    p.pre_request(cold, req(), result(eps[0]))
    p.pre_request(cold, req(), result(eps[1]))
    s = score(p, eps, cycle=cold)
    assert s == [0.5, 0.0, 1.0]  # never used > least recent > most recent
    assert score(p, eps, cycle=warm) == [0.5, 0.5, 0.5]
    p.pre_request(warm, req(), result(eps[2]))  # warm picks do not count
    assert score(p, eps, cycle=cold)[2] == 1.0
    # the hit is on e1, not a candidate: cold for these; e2's rank is 1 + its LRU position 1 -> 0
    assert score(p, eps[1:], cycle=warm) == [0.0, 1.0]
    p.endpoints_removed([eps[0]])
    assert score(p, eps, cycle=cold)[0] == 1.0
    assert score(p, [eps[1]], cycle=cold) == [1.0]  # one candidate
    both = result(eps[2], "decode", prefill=eps[0])
    score(p, eps, cycle=cold)
    p.pre_request(cold, req(), both)  # the prefill target is recorded too
    assert list(p._lru) == [eps[1], eps[2], eps[0]]
    assert plugin("no-hit-lru-scorer", {"lruSize": 0}).size == 1024  # <= 0: the default, as the reference


def test_context_length_aware():
    """Reference: scheduling/scorer/contextlengthaware/context_length_aware.go (the token
    count from the token producer; in range 0.3 + 0.7 * (0.7 / (1 + w/10000) + 0.3 * headroom/w);
    out of range 0.3 / (1 + d/1000); no label 0.5; a bad label 0.0)."""
    p = plugin("context-length-aware")
    label = "llm-d.ai/context-length-range"
    eps = [ep(1, {label: "0-1000"}), ep(2, {label: "0-8000"}), ep(3, {label: "2000-8000"}), ep(4),
           ep(5, {label: "junk"}), ep(6, {label: "500-500"}), ep(7, {label: "9-3"})]
    cycle = CycleState()
    cycle.write(TOKENIZED_PROMPT, 500)
    s = score(p, eps, cycle=cycle)
    assert s[0] == pytest.approx(0.3 + 0.7 * (0.7 / 1.1 + 0.3 * 0.5))
    assert s[1] == pytest.approx(0.3 + 0.7 * (0.7 / 1.8 + 0.3 * 7500 / 8000))
    assert s[2] == pytest.approx(0.3 / 2.5)  # 1500 tokens below the range
    assert s[3:] == [0.5, 0.0, 1.0, 0.0]  # no label, junk, exact fit, min > max
    assert score(p, eps[:1]) == [pytest.approx(0.3 + 0.7 * (0.7 / 1.1 + 0.3))]  # no token count: 0
    assert p.filter(cycle, req(), eps) == eps  # filtering off
    f = plugin("context-length-aware", {"enableFiltering": True})
    assert f.filter(cycle, req(), eps) == [eps[0], eps[1], eps[3], eps[5]]  # bad labels go too
    with pytest.raises(ValueError, match="label: must be specified"):
        plugin("context-length-aware", {"label": ""})
