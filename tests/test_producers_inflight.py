"""inflight-load-producer and its consumers, against today's reference
(llm-d-router pkg/epp/framework/plugins/requestcontrol/dataproducer/inflightload/producer.go,
token_estimator.go; scheduling/scorer/tokenload/token_load.go; scheduling/scorer/activerequest/
active_request.go; scheduling/filter/prefixcacheaffinity/plugin.go; default producers created
for a consumer's Required key by pkg/epp/datalayer/data_graph.go CreateMissingDataProducers)."""

import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.assembly import build_plugin, load_plugin_set
from epp.config import ConfigError, load_config
from epp.framework import (
    CycleState,
    Endpoint,
    InferenceRequest,
    PluginHandle,
    ResponseInfo,
)
from epp.framework.datakeys import INFLIGHT_LOAD, PREFIX_MATCH_INFO, TOKENIZED_PROMPT, PrefixCacheMatchInfo
from epp.framework.metrics import PluginMetrics
from epp.requestcontrol.producers import inflight
from epp.requestcontrol.producers.inflight import estimate_output, uncached_input
from tests.helpers import result

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "configs"


def ep(i):
    return Endpoint(f"e{i}", f"10.0.0.{i}", 8000, namespace="ns")


def req(rid="r", max_tokens=None, fairness="f", priority=0):
    return InferenceRequest(rid, "m", "m", "completions", "x" * 400, {}, max_tokens=max_tokens,
                            fairness_id=fairness, priority=priority)


def producer(params=None, metrics=None):
    h = PluginHandle(rng=random.Random(1), metrics=metrics or PluginMetrics())
    return build_plugin("inflight-load-producer", None, params, h, "t")


def cycle_with(tokens, match=None):
    c = CycleState()
    c.write(TOKENIZED_PROMPT, tokens)
    if match is not None:
        c.write(PREFIX_MATCH_INFO, match)
    return c


def commit(p, rid, cycle, **profiles):
    request = req(rid)
    eps = [e for e in profiles.values()]
    p.prepare_request_data(cycle, request, eps)
    (primary, target), *others = profiles.items()
    p.pre_request(cycle, request, result(target, primary, **dict(others)))
    return request


def test_output_estimate_formula():
    assert estimate_output(100, 1.5, None, None) == 150
    assert estimate_output(3, 1.5, None, None) == 5  # Go's math.Round(4.5) = 5 (not Python's banker's 4)
    assert estimate_output(100, 1.5, 40, None) == 40  # the client's max tokens
    assert estimate_output(100, 1.5, 400, 90) == 90  # the operator's cap
    assert estimate_output(0, 1.5, None, None) == 0
    assert estimate_output(100, 0.0, None, None) == 0


def test_uncached_tokens_discount_the_matched_prefix_and_add_the_tail():
    a, b = ep(1), ep(2)
    m = PrefixCacheMatchInfo({a: 3}, total_blocks=4, block_size_tokens=64, longest=3)
    assert uncached_input(m, a, 300) == (4 - 3) * 64 + (300 - 256)  # one block + the tail past the index
    assert uncached_input(m, b, 300) == 4 * 64 + 44
    assert uncached_input(None, a, 300) == 300
    assert uncached_input(PrefixCacheMatchInfo({}, 0, 0, 0), a, 300) == 300


def test_counts_tokens_until_the_first_chunk_and_requests_until_the_end():
    p = producer()
    a, b = ep(1), ep(2)
    m = PrefixCacheMatchInfo({a: 2}, total_blocks=4, block_size_tokens=64, longest=2)
    c = cycle_with(256, m)
    commit(p, "r1", c, default=a)
    published = c.read(INFLIGHT_LOAD)
    assert published.uncached == {a: 128}  # its cost on the candidate it was offered
    assert (p.requests, p.tokens) == ({a: 1}, {a: 128})
    p.response_streaming(req("r1"), ResponseInfo(), a)  # first chunk: the prompt is done
    assert (p.requests, p.tokens) == ({a: 1}, {})
    p.response_streaming(req("r1"), ResponseInfo(end_of_stream=True), a)
    assert (p.requests, p.tokens) == ({}, {})
    p.response_complete(req("r1"), ResponseInfo(), a)  # after the end: nothing left to release
    assert (p.requests, p.tokens) == ({}, {})
    commit(p, "r2", cycle_with(256), default=b)
    assert p.tokens == {b: 256}
    p.response_complete(req("r2"), ResponseInfo(), b)  # client went away before any chunk
    assert (p.requests, p.tokens) == ({}, {})


def test_estimated_output_stays_until_the_end_and_prefill_goes_at_the_first_chunk():
    p = producer({"addEstimatedOutputTokens": True, "outputRatio": 0.5, "maxEstimatedOutputTokens": 1000})
    d, pf = ep(1), ep(2)
    commit(p, "r", cycle_with(200), default=d, prefill=pf)
    assert p.tokens == {d: 300, pf: 300} and p.requests == {d: 1, pf: 1}
    p.response_streaming(req("r"), ResponseInfo(), d)
    assert p.tokens == {d: 300} and p.requests == {d: 1}  # prefill handed off; decode keeps its estimate
    p.response_complete(req("r"), ResponseInfo(), d)
    assert (p.requests, p.tokens) == ({}, {})


def test_a_retried_request_id_is_counted_once_and_tracking_is_bounded(monkeypatch):
    p = producer()
    a = ep(1)
    commit(p, "same", cycle_with(10), default=a)
    commit(p, "same", cycle_with(10), default=a)
    assert (p.requests, p.tokens) == ({a: 1}, {a: 10})
    monkeypatch.setattr(inflight, "MAX_TRACKED_REQUESTS", 3)
    for i in range(5):
        commit(p, f"n{i}", cycle_with(10), default=a)
    assert len(p._tracked) == 3 and p.requests == {a: 3}  # the oldest were released, not leaked


def test_removed_endpoints_are_forgotten_and_late_releases_do_not_go_negative():
    p = producer()
    a = ep(1)
    commit(p, "r", cycle_with(50), default=a)
    p.endpoints_removed([a])
    assert (p.requests, p.tokens) == ({}, {})
    p.response_complete(req("r"), ResponseInfo(), a)
    assert (p.requests, p.tokens) == ({}, {})


def test_gauges_carry_the_references_labels():
    reg = CollectorRegistry()
    m = PluginMetrics(reg)
    p, p2 = producer(metrics=m), build_plugin("inflight-load-producer", "second", None, PluginHandle(metrics=m), "t")
    a = ep(1)
    commit(p, "r", cycle_with(70), default=a)
    commit(p2, "r", cycle_with(30), default=a)
    samples = {(s.name, s.labels["producer_name"]): (s.value, s.labels)
               for f in text_string_to_metric_families(generate_latest(reg).decode()) for s in f.samples}
    value, labels = samples[("llm_d_epp_inflight_tokens", "inflight-load-producer")]
    assert value == 70 and labels == {"endpoint_name": "e1", "namespace": "ns", "producer_name": "inflight-load-producer",
                                      "fairness_id": "f", "priority": "0"}
    assert samples[("llm_d_epp_inflight_requests", "second")][0] == 1
    p.response_complete(req("r"), ResponseInfo(), a)
    names = {(s.name, s.labels["producer_name"]) for f in text_string_to_metric_families(generate_latest(reg).decode())
             for s in f.samples}
    assert ("llm_d_epp_inflight_tokens", "inflight-load-producer") not in names  # released: no series left


def test_scorers_read_the_producer_not_the_directors_endpoint_counts():
    ps = load_plugin_set("""
plugins:
- {type: token-load-scorer, parameters: {queueThresholdTokens: 1000}}
- {type: active-request-scorer}
schedulingProfiles:
- {name: default, plugins: [{pluginRef: token-load-scorer}, {pluginRef: active-request-scorer}]}
""")
    a, b = ep(1), ep(2)
    a.in_flight, a.in_flight_tokens = 50, 10**6  # the director's accounting (API, metrics): not scored
    request = InferenceRequest("r", "m", "m", "completions", "x" * 800, {})  # 200 tokens by estimate
    cycle, result = ps.run_cycle(request, [a, b])
    load = cycle.read(INFLIGHT_LOAD)
    assert load.uncached == {a: 200, b: 200} and load.requests == {} and load.tokens == {}
    target = result.targets[0]
    other = b if target is a else a
    assert ps.plugins["inflight-load-producer"].tokens == {target: 200}
    token_load, active = ps.plugins["token-load-scorer"], ps.plugins["active-request-scorer"]
    cycle = CycleState()
    for prepare in ps._prepare:
        prepare(cycle, request, [target, other])
    assert token_load.score(cycle, request, [target, other]) == [pytest.approx(0.6), pytest.approx(0.8)]
    assert active.score(cycle, request, [target, other]) == [0.0, 1.0]


def test_missing_producers_are_added_as_the_reference_adds_defaults_and_named_ones_must_exist():
    cfg = load_config("plugins: [{type: token-load-scorer}]")
    names = [(p.name, p.implicit) for p in cfg.plugins][:3]
    assert names == [("token-producer", True), ("inflight-load-producer", True), ("token-load-scorer", False)]
    assert cfg.plugin("token-load-scorer").parameters == {"inFlightLoadProducerName": "inflight-load-producer"}
    named = load_config("""
plugins:
- {type: active-request-scorer, parameters: {inFlightLoadProducerName: mine}}
- {type: inflight-load-producer, name: mine, parameters: {addEstimatedOutputTokens: true}}
""")
    assert [p.type for p in named.plugins].count("inflight-load-producer") == 1
    assert [p.name for p in named.plugins][:3] == ["active-request-scorer", "token-producer", "mine"]
    with pytest.raises(ConfigError, match=r"plugins\[0\].parameters.inFlightLoadProducerName: no plugin named 'nope'"):
        load_config("plugins: [{type: token-load-scorer, parameters: {inFlightLoadProducerName: nope}}]")
    with pytest.raises(ConfigError, match="outputRatio: must be >= 0"):
        load_config("plugins: [{type: inflight-load-producer, parameters: {outputRatio: -1}}]")
    for sync in ("true", "false"):  # meaningful only with a cross-replica syncer, which is refused
        load_config(f"plugins: [{{type: inflight-load-producer, parameters: {{syncCrossReplicaState: {sync}}}}}]")


def test_optimized_baseline_fixture_wires_one_producer_per_key_in_dependency_order():
    cfg = load_config((FIXTURES / "llm-d-optimized-baseline.yaml").read_text())
    types = [p.type for p in cfg.plugins]
    for t in ("token-producer", "inflight-load-producer", "approx-prefix-cache-producer"):
        assert types.count(t) == 1
    # the in-flight producer reads the prefix match (its discount) and the token count: it runs after both
    assert types.index("inflight-load-producer") > types.index("approx-prefix-cache-producer")
    assert types.index("inflight-load-producer") > types.index("token-producer")
    assert cfg.plugin("approx-prefix-cache-producer").parameters == {"maxPrefixTokensToMatch": 40960}


def test_affinity_filter_ttft_gate_on_in_flight_tokens():
    """prefixcacheaffinity/plugin.go: ttft = in-flight tokens / peakPrefillThroughput x 1000 ms."""
    from epp.framework.datakeys import InFlightLoadInfo
    sticky, cold = ep(1), ep(2)
    cycle = CycleState()
    cycle.write(PREFIX_MATCH_INFO, PrefixCacheMatchInfo({sticky: 10}, 10, 64, 10))

    def f(params):
        return build_plugin("prefix-cache-affinity-filter", None, params, PluginHandle(rng=random.Random(1)), "t")

    cycle.write(INFLIGHT_LOAD, InFlightLoadInfo(tokens={sticky: 15928 * 18}))  # 18 000 ms behind: within
    assert f(None).filter(cycle, req(), [sticky, cold]) == [sticky]
    cycle.write(INFLIGHT_LOAD, InFlightLoadInfo(tokens={sticky: 15928 * 19}))  # 19 000 ms: gate broken
    assert f(None).filter(cycle, req(), [sticky, cold]) == [sticky, cold]
    assert f({"maxTTFTPenaltyMs": 0}).filter(cycle, req(), [sticky, cold]) == [sticky]  # gate off
    assert f({"peakPrefillThroughput": 15928 * 100}).filter(cycle, req(), [sticky, cold]) == [sticky]
    with pytest.raises(ValueError, match="ttftSource: must be 'latencyPredictor' or 'prefillThroughput'"):
        f({"ttftSource": "predictor"})
    with pytest.raises(ValueError, match="peakPrefillThroughput: must be > 0"):
        f({"peakPrefillThroughput": 0})
    assert f({"ttftSource": "latencyPredictor", "maxTTFTPenaltyMs": 0}).max_penalty_ms == 0
    # ttftSource latencyPredictor: the gate reads the predicted TTFT; no prediction is never the fastest
    from epp.framework.datakeys import LATENCY_PREDICTIONS, LatencyPredictionInfo, LatencyPredictions

    def predicted(ms):
        return LatencyPredictionInfo(ms, 0.0, -ms, 0.0, False, True)
    gate = f({"ttftSource": "latencyPredictor", "maxTTFTPenaltyMs": 5000})
    cycle.write(LATENCY_PREDICTIONS, LatencyPredictions({sticky: predicted(5100.0), cold: predicted(50.0)}))
    assert gate.filter(cycle, req(), [sticky, cold]) == [sticky, cold]  # 5 050 ms behind: gate broken
    cycle.write(LATENCY_PREDICTIONS, LatencyPredictions({sticky: predicted(4000.0), cold: predicted(50.0)}))
    assert gate.filter(cycle, req(), [sticky, cold]) == [sticky]
    cycle.write(LATENCY_PREDICTIONS, LatencyPredictions({cold: predicted(50.0)}))
    assert gate.filter(cycle, req(), [sticky, cold]) == [sticky, cold]
    cycle.write(LATENCY_PREDICTIONS, LatencyPredictions())
    assert gate.filter(cycle, req(), [sticky, cold]) == [sticky]
    assert f(None).exploration == 0.0  # the reference's default
