"""The remaining scheduling plugins of today's reference (issue 11 item 4), plugin-level:
session-affinity-filter (+ multicluster-session-affinity-filter), utilization-filter and
header-label-affinity-scorer, against the reference's files (llm-d/llm-d-router @ ebab687,
pkg/epp/framework/plugins/scheduling/...), cited per test."""

from __future__ import annotations

import base64

import pytest

from epp.assembly import load_plugin_set
from epp.config import ConfigError
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    Metrics,
    ResponseInfo,
)
from epp.framework.datakeys import INFLIGHT_LOAD, SESSION_ID, InFlightLoadInfo
from epp.framework.params import PluginError
from epp.framework.registry import ALPHA_TYPES, stability
from epp.scheduling.sessionaffinity import MAX_SESSIONS
from tests import helpers
from tests.helpers import Clock, ep, result


def req(headers=None, rid="r"):
    return InferenceRequest(rid, "m", "m", "completions", "x" * 100, headers or {})


def plugin(ptype, params=None, clock=None):
    return helpers.plugin(ptype, params, clock, where="plugins[0]")


def token(e: Endpoint) -> str:
    return base64.standard_b64encode(f"{e.namespace}/{e.name}".encode()).decode()


def route(f, eps, headers, rid="r", cycle=None):
    """One request through the filter: filter, pick the first kept, PreRequest; the pick."""
    cycle = CycleState() if cycle is None else cycle
    r = req(headers, rid)
    kept = f.filter(cycle, r, eps)
    f.pre_request(cycle, r, result(kept[0]))
    return kept


def test_stability_alpha_as_the_reference():
    """plugins.txt: all four are registered Alpha in the reference."""
    for t in ("session-affinity-filter", "multicluster-session-affinity-filter", "utilization-filter",
              "header-label-affinity-scorer"):
        assert t in ALPHA_TYPES and stability(t) == "Alpha"
    with pytest.raises(ConfigError, match="has Alpha stability level"):
        load_plugin_set("plugins: [{type: utilization-filter, parameters: {conditions: "
                        "[{metric: waiting-queue, maxValue: 1}]}}]\n", allow_experimental_plugins=False)


# --------------------------------------------------------------------------- session-affinity-filter
def test_session_filter_encoded_header_pins_and_passes_through():
    """filter/sessionaffinity/encoded_endpoint_header.go: the token's endpoint alone when a
    candidate, otherwise every candidate; never empty."""
    f = plugin("session-affinity-filter")
    eps = [ep(1), ep(2), ep(3)]
    assert list(f.filter(CycleState(), req({"x-session-token": token(eps[1])}), eps)) == [eps[1]]
    for headers in ({}, {"x-session-token": ""}, {"x-session-token": "!!not base64!!"},
                    {"x-session-token": token(ep(9))}, {"x-session-token": "A" * 1_000_000},
                    {"x-session-token": base64.b64encode(b"\xff\xfe").decode()}):
        assert list(f.filter(CycleState(), req(headers), eps)) == eps
    assert list(f.filter(CycleState(), req({"x-session-token": token(eps[0])}), [])) == []


def test_session_filter_writes_the_token_on_the_response():
    """util/sessionaffinity/header.go WriteResponseHeader/ResolvePodToWrite: base64 of
    namespace/name of the target; with profileName, that profile's target, none when it did
    not run; header name configurable and lowercased."""
    f = plugin("session-affinity-filter")
    info = ResponseInfo()
    f.response_received(req(), info, ep(2))
    assert info.set_headers == {"x-session-token": token(ep(2))}
    g = plugin("session-affinity-filter", {"profileName": "prefill",
                                            "encodedEndpointHeaderConfig": {"header": " X-Session-Token-Prefill "}})
    assert list(g.filter(CycleState(), req({"x-session-token-prefill": token(ep(5))}), [ep(4), ep(5)]))[0].name == "e5"
    g.pre_request(CycleState(), req(rid="a"), result(ep(1), prefill=ep(7)))
    info = ResponseInfo()
    g.response_received(req(rid="a"), info, ep(1))
    assert info.set_headers == {"x-session-token-prefill": token(ep(7))}
    g.pre_request(CycleState(), req(rid="b"), result(ep(1)))  # decode-only: prefill did not run
    info = ResponseInfo()
    g.response_received(req(rid="b"), info, ep(1))
    assert info.set_headers == {}


def test_session_filter_session_id_binds_keeps_and_rebinds():
    """util/sessionaffinity/session_id.go: unbound -> no preference; bound -> the endpoint
    alone; bound endpoint gone -> every candidate, then re-bound to the one picked."""
    f = plugin("session-affinity-filter", {"strategy": "session_id"})
    eps = [ep(1), ep(2), ep(3)]
    h = {"x-session-id": " alice "}
    assert route(f, eps[1:], h) == eps[1:]  # unbound: all; e2 picked and bound
    assert route(f, eps, h) == [eps[1]]
    assert route(f, eps, {"x-session-id": "alice"}) == [eps[1]]  # trimmed
    assert route(f, [eps[0], eps[2]], h) == [eps[0], eps[2]]  # e2 gone: all; re-bound to e1
    assert route(f, eps, h) == [eps[0]]
    assert route(f, eps, {}) == eps  # no session id
    info = ResponseInfo()
    f.response_received(req(h), info, eps[0])
    assert info.set_headers == {}  # session_id writes nothing back


def test_session_filter_binding_not_moved_without_confirmed_absence():
    """session_id.go PreRequest: a different pick moves the binding only on a confirmed absence
    recorded by this request's own filter call."""
    f = plugin("session-affinity-filter", {"strategy": "session_id"})
    eps = [ep(1), ep(2)]
    route(f, eps, {"x-session-id": "s"})
    f.pre_request(CycleState(), req({"x-session-id": "s"}), result(eps[1]))  # no filter call recorded
    assert list(f.filter(CycleState(), req({"x-session-id": "s"}), eps)) == [eps[0]]


def test_session_filter_ttl_defaults_and_sweep():
    """session_id.go: evictionTtlSeconds=300, evictionSweepSeconds=10 defaults; unused
    bindings past the TTL are swept."""
    clock = Clock()
    f = plugin("session-affinity-filter", {"strategy": "session_id"}, clock=clock)
    assert (f.bindings.ttl, f.bindings.sweep_every) == (300.0, 10.0)
    eps = [ep(1), ep(2)]
    route(f, [eps[1]], {"x-session-id": "old"})
    clock.now += 301
    route(f, eps, {"x-session-id": "new"})  # a commit sweeps
    assert f.bindings.get("old") is None and f.bindings.get("new") == "default/e1"
    assert list(f.filter(CycleState(), req({"x-session-id": "old"}), eps)) == eps
    g = plugin("session-affinity-filter", {"strategy": "session_id", "sessionIdConfig": {
        "evictionTtlSeconds": 1.5, "evictionSweepSeconds": 0.5}}, clock=clock)
    assert (g.bindings.ttl, g.bindings.sweep_every) == (1.5, 0.5)


def test_session_filter_sources_header_then_producer_attribute():
    """session_id.go resolveSessionID: sources in order, first non-empty; {attribute, producer}
    reads the producer's string (session-id-producer's SessionIDDataKey)."""
    f = plugin("session-affinity-filter", {"strategy": "session_id", "sessionIdConfig": {"sources": [
        {"header": "X-Conv"}, {"attribute": "SessionIDDataKey", "producer": "session-id-producer"}]}})
    eps = [ep(1), ep(2)]
    cycle = CycleState()
    cycle.write(SESSION_ID, "from-cookie")
    route(f, [eps[1]], {}, cycle=cycle)
    assert f.bindings.get("from-cookie") == "default/e2"
    route(f, [eps[0]], {"x-conv": "c1"})
    assert f.bindings.get("c1") == "default/e1"
    cycle = CycleState()
    cycle.write(SESSION_ID.of("session-id-producer"), 42)  # not a string: skipped
    assert list(f.filter(cycle, req(), eps)) == eps


def test_session_filter_bounded_and_huge_ids_ignored():
    """Hostile input: bindings are bounded (MAX_SESSIONS); an oversized id is no session."""
    f = plugin("session-affinity-filter", {"strategy": "session_id"})
    f.bindings.bound = 4
    for i in range(10):
        route(f, [ep(1)], {"x-session-id": f"s{i}"})
    assert len(f.bindings) == 4 and f.bindings.get("s0") is None and f.bindings.get("s9") == "default/e1"
    route(f, [ep(1)], {"x-session-id": "x" * 100_000})
    assert f.bindings.get("x" * 100_000) is None
    assert MAX_SESSIONS >= 1 << 16


@pytest.mark.parametrize("params, message", [
    ({"strategy": "sticky"}, "strategy: must be 'encoded_endpoint_header' or 'session_id'"),
    ({"strategy": "session_id", "sessionIdConfig": {"sources": [{"header": "a", "attribute": "b"}]}},
     "sessionIdConfig.sources[0]: exactly one of header or attribute must be set"),
    ({"strategy": "session_id", "sessionIdConfig": {"sources": [{}]}},
     "sessionIdConfig.sources[0]: exactly one of header or attribute must be set"),
    ({"strategy": "session_id", "sessionIdConfig": {"evictionTtlSeconds": -1}},
     "sessionIdConfig.evictionTtlSeconds: must be > 0"),
    ({"sessionIdConfig": {"bogus": 1}}, "sessionIdConfig.bogus: unknown parameter"),
    ({"header": "x"}, "plugins[0].parameters.header: unknown parameter"),
])
def test_session_filter_parameters_strict(params, message):
    """filter/sessionaffinity/session_affinity.go validate; strict keys."""
    with pytest.raises(PluginError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plugin("session-affinity-filter", params)


def test_multicluster_session_affinity_filter_delegates():
    """filter/sessionaffinity/multicluster.go: the stock filter under its own type name."""
    f = plugin("multicluster-session-affinity-filter", {"strategy": "session_id"})
    assert f.type_name == "multicluster-session-affinity-filter" and f.name == "multicluster-session-affinity-filter"
    eps = [ep(1), ep(2)]
    route(f, [eps[1]], {"x-session-id": "s"})
    assert list(f.filter(CycleState(), req({"x-session-id": "s"}), eps)) == [eps[1]]


# --------------------------------------------------------------------------- utilization-filter
def load(**requests):
    info = InFlightLoadInfo()
    info.requests.update(requests)
    return info


def test_utilization_filter_every_condition_at_most_max():
    """filter/utilization/filter.go: kept when every metric <= maxValue (inclusive)."""
    f = plugin("utilization-filter", {"conditions": [{"metric": "waiting-queue", "maxValue": 2},
                                                     {"metric": "kv-cache-utilization", "maxValue": 0.5}]})
    eps = [ep(1, waiting_queue_size=2, kv_cache_usage_percent=0.5), ep(2, waiting_queue_size=3),
           ep(3, kv_cache_usage_percent=0.51), ep(4)]
    assert list(f.filter(CycleState(), req(), eps)) == [eps[0], eps[3]]
    g = plugin("utilization-filter", {"conditions": [{"metric": "running-requests", "maxValue": 0}]})
    assert list(g.filter(CycleState(), req(), [ep(1, running_requests_size=1), ep(2)]))[0].name == "e2"


def test_utilization_filter_active_requests_from_the_inflight_producer():
    """filter.go activeRequestCount: the in-flight load producer's request count, 0 when
    absent; inFlightLoadProducerName selects the producer instance."""
    eps = [ep(1), ep(2), ep(3)]
    f = plugin("utilization-filter", {"conditions": [{"metric": "active-requests", "maxValue": 1}]})
    cycle = CycleState()
    cycle.write(INFLIGHT_LOAD, InFlightLoadInfo(requests={eps[0]: 2, eps[1]: 1}))
    assert list(f.filter(cycle, req(), eps)) == eps[1:]
    assert list(f.filter(CycleState(), req(), eps)) == eps  # no producer output: 0 each
    g = plugin("utilization-filter", {"conditions": [{"metric": "active-requests", "maxValue": 0}],
                                      "inFlightLoadProducerName": "mine"})
    cycle.write(INFLIGHT_LOAD.of("mine"), InFlightLoadInfo(requests={eps[2]: 5}))
    assert list(g.filter(cycle, req(), eps)) == eps[:2]


def test_utilization_filter_fallback_on_empty_and_nan():
    """filter.go: fallbackOnEmpty=false by default (empty result); true returns the candidates.
    A NaN KV fraction does not exceed a cap (Go's NaN > x is false)."""
    eps = [ep(1, waiting_queue_size=9), ep(2, waiting_queue_size=9)]
    cond = [{"metric": "waiting-queue", "maxValue": 1}]
    assert list(plugin("utilization-filter", {"conditions": cond}).filter(CycleState(), req(), eps)) == []
    f = plugin("utilization-filter", {"conditions": cond, "fallbackOnEmpty": True})
    assert list(f.filter(CycleState(), req(), eps)) == eps
    k = plugin("utilization-filter", {"conditions": [{"metric": "kv-cache-utilization", "maxValue": 0.1}]})
    assert list(k.filter(CycleState(), req(), [ep(1, kv_cache_usage_percent=float("nan"))]))[0].name == "e1"


def test_utilization_filter_declares_the_inflight_producer():
    """filter.go Consumes: the inflight-load-producer is Required (the loader adds the default)."""
    ps = load_plugin_set("plugins: [{type: utilization-filter, parameters: {conditions: "
                         "[{metric: active-requests, maxValue: 3}]}}, {type: max-score-picker}]\n"
                         "schedulingProfiles: [{name: default, plugins: [{pluginRef: utilization-filter}, "
                         "{pluginRef: max-score-picker}]}]\n")
    assert "inflight-load-producer" in ps.plugins


@pytest.mark.parametrize("params, message", [
    (None, "conditions: at least one condition is required"),
    ({"conditions": []}, "conditions: at least one condition is required"),
    ({"conditions": [{"metric": "gpu", "maxValue": 1}]}, "conditions[0].metric: must be one of"),
    ({"conditions": [{"metric": "waiting-queue"}]}, "conditions[0].maxValue: required"),
    ({"conditions": [{"metric": "waiting-queue", "maxValue": -1}]}, "conditions[0].maxValue: must be >= 0"),
    ({"conditions": [{"metric": "waiting-queue", "maxValue": float("nan")}]}, "must be >= 0, got nan"),
    ({"conditions": [{"metric": "kv-cache-utilization", "maxValue": 80}]}, "is a fraction, must be <= 1"),
    ({"conditions": [{"metric": "waiting-queue", "maxValue": "5"}]}, "expected a number"),
    ({"conditions": [{"metric": "waiting-queue", "maxValue": 1}], "threshold": 1}, "threshold: unknown parameter"),
])
def test_utilization_filter_parameters_strict(params, message):
    """filter.go NewUtilizationFilter's checks; strict keys and types."""
    with pytest.raises(PluginError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plugin("utilization-filter", params)


# --------------------------------------------------------------------------- header-label-affinity-scorer
def test_header_label_affinity_scores():
    """scorer/headerlabelaffinity/plugin.go: label == header value -> 1, else 0; no header -> all 0;
    header name lowercased."""
    s = plugin("header-label-affinity-scorer", {"headerName": "X-Tenant", "labelKey": "tenant"})
    eps = [ep(1, {"tenant": "a"}), ep(2, {"tenant": "b"}), ep(3), ep(4, {"tenant": "A"})]
    assert s.score(CycleState(), req({"x-tenant": "a"}), eps) == [1.0, 0.0, 0.0, 0.0]
    assert s.score(CycleState(), req({}), eps) == [0.0] * 4
    assert s.score(CycleState(), req({"x-tenant": ""}), [ep(5, {"tenant": ""})]) == [0.0]
    assert s.score(CycleState(), req({"x-tenant": "z" * 100_000}), eps) == [0.0] * 4


@pytest.mark.parametrize("params, message", [
    (None, "headerName: required"),
    ({"headerName": "x-t"}, "labelKey: required"),
    ({"labelKey": "t"}, "headerName: required"),
    ({"headerName": "x-t", "labelKey": "t", "weight": 2}, "weight: unknown parameter"),
])
def test_header_label_affinity_parameters_required(params, message):
    """plugin.go Factory: parameters, headerName and labelKey are required."""
    with pytest.raises(PluginError, match=message):
        plugin("header-label-affinity-scorer", params)


# --------------------------------------------------------------------------- endpoint-attribute-*
def cm(i, **custom):
    return Endpoint(f"e{i}", f"10.0.0.{i}", 8000, metrics=Metrics(custom=custom))


def attr_filter(op, value, **kw):
    return plugin("endpoint-attribute-filter", {"attribute": "q", **kw,
                                                "algorithm": {"type": "threshold",
                                                              "threshold": {"operator": op, "value": value}}})


@pytest.mark.parametrize("op, kept", [
    ("LessThan", ["e1"]), ("LessThanOrEqual", ["e1", "e2"]), ("GreaterThan", ["e3"]),
    ("GreaterThanOrEqual", ["e2", "e3"]), ("Equal", ["e2"]), ("NotEqual", ["e1", "e3"]),
])
def test_endpoint_attribute_filter_operators(op, kept):
    """filter/endpointattribute/filter.go matches: value <op> threshold.value."""
    eps = [cm(1, q=1.0), cm(2, q=5.0), cm(3, q=9.0)]
    assert [e.name for e in attr_filter(op, 5).filter(CycleState(), req(), eps)] == kept


def test_endpoint_attribute_filter_missing_and_fallback():
    """filter.go: onMissing Pass (default) keeps an endpoint without the attribute, Fail drops it;
    a NaN value counts as missing; fallbackOnEmpty (false) returns every candidate when none is kept."""
    eps = [cm(1), cm(2, q=float("nan")), cm(3, q=9.0), cm(4, other=0.0)]
    assert [e.name for e in attr_filter("LessThan", 5).filter(CycleState(), req(), eps)] == ["e1", "e2", "e4"]
    f = attr_filter("LessThan", 5, onMissing="Fail")
    assert list(f.filter(CycleState(), req(), eps)) == []
    g = attr_filter("LessThan", 5, onMissing="Fail", fallbackOnEmpty=True)
    assert list(g.filter(CycleState(), req(), eps)) == eps
    h = attr_filter("LessThan", 5, producer="core-metrics-extractor")  # explicit default producer
    assert [e.name for e in h.filter(CycleState(), req(), [cm(1, q=1.0), cm(2, q=6.0)])] == ["e1"]


def ea_scorer(kind, **normalization):
    return plugin("endpoint-attribute-scorer", {"attributeKey": "q", "algorithm": {
        "type": kind, **({"normalization": normalization} if normalization else {})}})


def test_endpoint_attribute_scorer_adaptive_range():
    """scorer/endpointattribute/endpointattribute.go scoreAdaptiveRange: (v-min)/(max-min) over the
    candidates having the attribute, inverted for linear_lower_is_better; all equal -> 1.0; missing -> 0
    and out of the range."""
    eps = [cm(1, q=2.0), cm(2, q=4.0), cm(3, q=10.0), cm(4)]
    assert ea_scorer("linear_lower_is_better").score(CycleState(), req(), eps) == [1.0, 0.75, 0.0, 0.0]
    assert ea_scorer("linear_higher_is_better").score(CycleState(), req(), eps) == [0.0, 0.25, 1.0, 0.0]
    assert ea_scorer("linear_lower_is_better", adaptiveRange={}).score(
        CycleState(), req(), [cm(1, q=3.0), cm(2, q=3.0), cm(3)]) == [1.0, 1.0, 0.0]
    assert ea_scorer("linear_higher_is_better").score(CycleState(), req(), [cm(1), cm(2)]) == [0.0, 0.0]
    assert ea_scorer("linear_higher_is_better").score(
        CycleState(), req(), [cm(1, q=float("nan")), cm(2, q=1.0), cm(3, q=float("inf"))]) == [0.0, 1.0, 0.0]


def test_endpoint_attribute_scorer_fixed_range_clamps():
    """endpointattribute.go scoreFixedRange: (v-min)/(max-min) clamped to [0, 1]."""
    s = ea_scorer("linear_lower_is_better", fixedRange={"min": 0, "max": 1})
    eps = [cm(1, q=0.25), cm(2, q=-3.0), cm(3, q=7.0), cm(4)]
    assert s.score(CycleState(), req(), eps) == [0.75, 1.0, 0.0, 0.0]
    h = ea_scorer("linear_higher_is_better", fixedRange={"min": 10, "max": 20})
    assert h.score(CycleState(), req(), [cm(1, q=15.0)]) == [0.5]


@pytest.mark.parametrize("ptype, params, message", [
    ("endpoint-attribute-filter", {}, "attribute: a non-empty attribute is required"),
    ("endpoint-attribute-filter", {"attribute": "q", "algorithm": {"type": "percentile"}},
     "algorithm.type: must be 'threshold'"),
    ("endpoint-attribute-filter", {"attribute": "q", "algorithm": {"type": "threshold"}},
     "algorithm.threshold: required"),
    ("endpoint-attribute-filter", {"attribute": "q", "onMissing": "pass", "algorithm": {
        "type": "threshold", "threshold": {"operator": "LessThan", "value": 1}}}, "onMissing: must be 'Pass' or 'Fail'"),
    ("endpoint-attribute-filter", {"attribute": "q", "algorithm": {
        "type": "threshold", "threshold": {"operator": "<", "value": 1}}}, "algorithm.threshold.operator: must be"),
    ("endpoint-attribute-filter", {"attribute": "q/core-metrics-extractor", "algorithm": {
        "type": "threshold", "threshold": {"operator": "LessThan", "value": 1}}},
     "attribute: attribute 'q/core-metrics-extractor' contains '/' but no producer is set"),
    ("endpoint-attribute-filter", {"attribute": "gpu_util", "producer": "dcgm-extractor", "algorithm": {
        "type": "threshold", "threshold": {"operator": "LessThan", "value": 1}}},
     "producer: 'dcgm-extractor': endpoint attributes of GPU metrics .* not built yet"),
    ("endpoint-attribute-scorer", {}, "attributeKey: a non-empty attributeKey is required"),
    ("endpoint-attribute-scorer", {"attributeKey": "q", "algorithm": {"type": "linear"}}, "algorithm.type: must be"),
    ("endpoint-attribute-scorer", {"attributeKey": "q", "algorithm": {"type": "linear_lower_is_better",
                                                                      "normalization": {"fixedRange": {"min": 1, "max": 1}}}},
     "fixedRange: requires min < max"),
    ("endpoint-attribute-scorer", {"attributeKey": "q", "algorithm": {"type": "linear_lower_is_better", "normalization": {
        "fixedRange": {"min": 0, "max": 1}, "adaptiveRange": {}}}}, "at most one normalization strategy"),
    ("endpoint-attribute-scorer", {"attributeKey": "llm-d.ai/multicluster-queue-size", "producer": "",
                                   "algorithm": {"type": "linear_lower_is_better"}},
     "producer: '': endpoint attributes of producer-agnostic endpoint attributes .* not built yet"),
    ("endpoint-attribute-scorer", {"attributeKey": "q", "producer": "token-producer",
                                   "algorithm": {"type": "linear_lower_is_better"}},
     "producer: 'token-producer' publishes no endpoint attribute here"),
    ("endpoint-attribute-scorer", {"attributeKey": "q", "weight": 1, "algorithm": {"type": "linear_lower_is_better"}},
     "weight: unknown parameter"),
])
def test_endpoint_attribute_parameters_strict(ptype, params, message):
    """filter.go NewEndpointAttributeFilter / endpointattribute.go NewEndpointAttributeScorer checks and
    datalayer/attribute/metrics ResolveConfiguredKey; a producer not built here refuses naming the feature."""
    with pytest.raises(PluginError, match=message):
        plugin(ptype, params)


def test_endpoint_attribute_stability_alpha():
    """plugins.txt: both Alpha."""
    assert stability("endpoint-attribute-filter") == stability("endpoint-attribute-scorer") == "Alpha"
