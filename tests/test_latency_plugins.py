"""Latency-aware routing: predicted-latency-producer, latency-scorer, slo-headroom-tier-filter,
latency-slo-admitter, checked against the reference's formulas and defaults
(llm-d-router pkg/epp/framework/plugins/.../predictedlatency, scorer/latency,
filter/sloheadroomtier, admitter/latencyslo), and the producer's model learning a synthetic
latency law in virtual time."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from epp.assembly import build_plugin
from epp.config import ConfigError
from epp.framework import CycleState, InferenceRequest, PluginHandle
from epp.framework.datakeys import (
    LATENCY_PREDICTIONS,
    PREFIX_MATCH_INFO,
    TOKENIZED_PROMPT,
    LatencyPredictionInfo,
    LatencyPredictions,
    PrefixCacheMatchInfo,
)
from epp.framework.metrics import PluginMetrics
from epp.framework.params import PluginError
from epp.framework.types import ResponseInfo
from epp.requestcontrol import headers as control
from epp.requestcontrol.producers.latency.producer import PredictedLatencyProducer
from tests.helpers import Clock, ep, load_plugin_set, plugin, result

CONFIGS = Path(__file__).parent / "fixtures" / "reference" / "configs"


@pytest.fixture(autouse=True)
def close_producers(monkeypatch):
    """Every predicted-latency-producer a test builds is closed when the test ends, so the
    trainer thread its first response starts does not outlive the test."""
    made: list[PredictedLatencyProducer] = []
    configure = PredictedLatencyProducer.configure

    def recorded(self, *args, **kwargs):
        configure(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(PredictedLatencyProducer, "configure", recorded)
    yield made
    for p in made:
        p.close()
    assert not [p for p in made if p._train_thread is not None and p._train_thread.is_alive()]  # noqa: SLF001


def req(priority=0, ttft_slo=0.0, tpot_slo=0.0, rid="r"):
    r = InferenceRequest(rid, "m", "m", "completions", "x" * 400, {}, priority=priority)
    r.slo_ttft_ms, r.slo_tpot_ms = ttft_slo, tpot_slo
    return r


def info(ttft_headroom, tpot_headroom=0.0, dispatched=1, ttft=100.0, tpot=10.0):
    return LatencyPredictionInfo(ttft, tpot, ttft_headroom, tpot_headroom, ttft_headroom > 0, tpot_headroom >= 0,
                                 dispatched)


def cycle_with(predictions, ttft_slo=0.0, tpot_slo=0.0):
    c = CycleState()
    c.write(LATENCY_PREDICTIONS, LatencyPredictions(dict(predictions), ttft_slo, tpot_slo))
    return c


# --------------------------------------------------------------------------- headers
@pytest.mark.parametrize("headers, ttft, tpot", [
    ({"x-llm-d-slo-ttft-ms": "250", "x-llm-d-slo-tpot-ms": "12.5"}, 250.0, 12.5),
    ({"x-slo-ttft-ms": "300", "x-slo-tpot-ms": "20"}, 300.0, 20.0),  # the older names
    ({"x-llm-d-slo-ttft-ms": "100", "x-slo-ttft-ms": "999"}, 100.0, 0.0),  # canonical wins
    ({"x-llm-d-slo-ttft-ms": "fast", "x-llm-d-slo-tpot-ms": "nan"}, 0.0, 0.0),  # not a number: none
    ({"x-llm-d-slo-ttft-ms": "-5", "x-llm-d-slo-tpot-ms": "inf"}, 0.0, 0.0),
    ({"x-llm-d-slo-ttft-ms": "1" * 100}, 0.0, 0.0),
])
def test_slo_headers_parse_as_the_reference_reads_them(headers, ttft, tpot):
    r = control.apply(InferenceRequest("r", "m", "m", "completions", "", {}), headers)
    assert (r.slo_ttft_ms, r.slo_tpot_ms) == (ttft, tpot)
    assert {"x-llm-d-slo-ttft-ms", "x-slo-ttft-ms", "x-llm-d-slo-tpot-ms", "x-slo-tpot-ms"} <= set(control.STRIPPED)


# --------------------------------------------------------------------------- scorer
def test_scorer_defaults_are_the_references():
    s = plugin("latency-scorer")
    assert (s.params.ttftWeight, s.params.tpotWeight, s.params.headroomSelectionStrategy) == (0.8, 0.2, "least")
    assert (s.params.compositeKVWeight, s.params.compositeQueueWeight, s.params.compositePrefixWeight) == (1, 1, 1)
    with pytest.raises(PluginError, match="headroomSelectionStrategy: must be 'least' or 'most'"):
        plugin("latency-scorer", {"headroomSelectionStrategy": "best"})
    with pytest.raises(PluginError, match="ttftWeight: must be a finite number >= 0"):
        plugin("latency-scorer", {"ttftWeight": -1})


def test_scorer_positive_headroom_least_packs_and_most_spreads():
    a, b = ep(1), ep(2)
    c = cycle_with({a: info(100.0), b: info(300.0)}, ttft_slo=400)
    # |ttft headroom| 100 / 300: range 200; TPOT range 0, so TTFT takes all the weight
    assert plugin("latency-scorer").score(c, req(), [a, b]) == [1.01, 0.01]  # (int((1-0)*100)+1)/100
    assert plugin("latency-scorer", {"headroomSelectionStrategy": "most"}).score(c, req(), [a, b]) == [0.01, 1.01]


def test_scorer_mixed_tiers_scores_only_positive():
    a, b, n = ep(1), ep(2), ep(3)
    c = cycle_with({a: info(100.0, 5.0), b: info(100.0, 1.0), n: info(-50.0)}, ttft_slo=200, tpot_slo=20)
    # positive a, b: TTFT range 0 -> TPOT takes the weight; a has more TPOT headroom: least scores it lower
    assert plugin("latency-scorer").score(c, req(), [a, b, n]) == [0.01, 1.01, 0.0]


def test_scorer_all_negative_prefers_idle_then_least_severe_bucket():
    busy, idle = ep(1), ep(2)
    c = cycle_with({busy: info(-10.0), idle: info(-500.0, dispatched=0)})
    assert plugin("latency-scorer").score(c, req(), [busy, idle]) == [0.0, 0.51]  # idle alone: both ranges 0
    ttft_only, both, tpot_only = ep(3), ep(4), ep(5)
    c = cycle_with({ttft_only: info(-10.0, 1.0), both: info(-5.0, -1.0)})
    assert plugin("latency-scorer").score(c, req(), [ttft_only, both]) == [0.51, 0.0]
    c = cycle_with({ttft_only: info(-10.0, 1.0), both: info(-5.0, -1.0), tpot_only: info(20.0, -3.0)})
    assert plugin("latency-scorer").score(c, req(), [ttft_only, both, tpot_only]) == [0.0, 0.0, 0.51]
    # the least deficit wins even under "most" (forced for negative headroom)
    x, y = ep(6), ep(7)
    c = cycle_with({x: info(-10.0), y: info(-110.0)})
    for strategy in ("least", "most"):
        assert plugin("latency-scorer", {"headroomSelectionStrategy": strategy}).score(c, req(), [x, y]) == [1.01, 0.01]


def test_scorer_without_predictions_falls_back_to_the_composite():
    a = ep(1, kv_cache_usage_percent=0.2, waiting_queue_size=0)
    b = ep(2, kv_cache_usage_percent=0.6, waiting_queue_size=4)
    s = plugin("latency-scorer")
    # (1/3)(0.8 + 1 + 0) = 0.6; (1/3)(0.4 + 0 + 0) = 0.133 -> round(13.3) / 100
    assert s.score(CycleState(), req(), [a, b]) == [0.6, 0.13]
    c = CycleState()
    c.write(PREFIX_MATCH_INFO, PrefixCacheMatchInfo({b: 4}, 4, 16, 4))
    assert s.score(c, req(), [a, b]) == [0.6, 0.47]  # (0.4 + 0 + 1) / 3 = 0.4667
    assert plugin("latency-scorer", {"compositeKVWeight": 0, "compositeQueueWeight": 0,
                                     "compositePrefixWeight": 0}).score(CycleState(), req(), [a, b]) == [0.8, 0.4]


# --------------------------------------------------------------------------- filter
def test_headroom_tier_filter_tiers_and_exploration():
    pos, neg, unknown = ep(1), ep(2), ep(3)
    c = cycle_with({pos: info(10.0), neg: info(-10.0)})
    assert plugin("slo-headroom-tier-filter").epsilon == 0.01  # the reference's default
    assert plugin("slo-headroom-tier-filter", {"epsilonExploreNeg": 0}).filter(c, req(), [pos, neg, unknown]) == [pos]
    assert plugin("slo-headroom-tier-filter", {"epsilonExploreNeg": 1}).filter(c, req(), [pos, neg, unknown]) == \
        [neg, unknown]  # no prediction counts as the negative tier
    f = plugin("slo-headroom-tier-filter", seed=7)
    picks = [tuple(f.filter(c, req(), [pos, neg])) for _ in range(2000)]
    assert 0 < picks.count((neg,)) < 60  # ~1 % exploration
    assert plugin("slo-headroom-tier-filter").filter(cycle_with({neg: info(-1.0)}), req(), [neg, unknown]) == \
        [neg, unknown]
    assert plugin("slo-headroom-tier-filter").filter(CycleState(), req(), [pos, neg]) == [pos, neg]
    assert plugin("slo-headroom-tier-filter").filter(cycle_with({}), req(), [pos, neg]) == [pos, neg]
    assert plugin("slo-headroom-tier-filter").filter(c, req(), [neg]) == [neg]
    with pytest.raises(PluginError, match="epsilonExploreNeg"):
        plugin("slo-headroom-tier-filter", {"epsilonExploreNeg": 1.5})


# --------------------------------------------------------------------------- admitter
def test_latency_slo_admitter_rejects_only_sheddable_requests_no_endpoint_can_serve():
    a = ep(1, kv_cache_usage_percent=0.5, running_requests_size=3)
    b = ep(2, kv_cache_usage_percent=0.3, running_requests_size=1)
    adm = plugin("latency-slo-admitter")
    bad = cycle_with({a: info(-10.0), b: info(-5.0)}, ttft_slo=1)
    assert adm.admit_request(bad, req(-1, ttft_slo=1), [a, b]) == "no valid endpoint available to serve the request"
    assert adm.admit_request(bad, req(-1, tpot_slo=1), [a, b]) is not None
    assert adm.admit_request(bad, req(0, ttft_slo=1), [a, b]) is None  # not sheddable
    assert adm.admit_request(bad, req(-1), [a, b]) is None  # no SLO
    assert adm.admit_request(CycleState(), req(-1, ttft_slo=1), [a, b]) is None  # no predictions: fail open
    ok = cycle_with({a: info(-10.0), b: info(5.0)}, ttft_slo=1)
    assert adm.admit_request(ok, req(-1, ttft_slo=1), [a, b]) is None  # b meets it
    idle = ep(3, kv_cache_usage_percent=0.5, running_requests_size=0)
    cold = ep(4, kv_cache_usage_percent=0.01, running_requests_size=5)
    for spare in (idle, cold):
        c = cycle_with({a: info(-10.0), spare: info(-10.0)}, ttft_slo=1)
        assert adm.admit_request(c, req(-1, ttft_slo=1), [a, spare]) is None


def test_denial_is_the_references_500():
    ps = load_plugin_set("plugins: [{type: predicted-latency-producer}, {type: latency-slo-admitter}, "
                         "{type: queue-scorer}]\n")
    producer = ps.plugins["predicted-latency-producer"]
    producer.predict_enabled = True
    a = ep(1, kv_cache_usage_percent=0.5, running_requests_size=3)
    producer.model.predict = lambda cls, f: type("P", (), {"ttft_ms": 500.0, "tpot_ms": 5.0})()
    with pytest.raises(Exception) as e:
        ps.run_cycle(req(-1, ttft_slo=10), [a])
    assert (e.value.code, e.value.message, e.value.reason) == (
        "Internal", "request cannot be admitted: no valid endpoint available to serve the request", "")


# --------------------------------------------------------------------------- producer
def test_producer_defaults_and_parameters_are_the_references():
    p = plugin("predicted-latency-producer")
    assert (p.buffer, p.streaming, p.role_label, p.predict_enabled, p.context_ttl) == (1.0, False, "", True, 300.0)
    assert plugin("predicted-latency-producer", {"predictInPrepareData": False}).predict_enabled is False
    assert plugin("predicted-latency-producer", {"contextTTL": "30s", "samplingMean": 50}).context_ttl == 30.0
    for params, message in (({"sloBufferFactor": 0}, "sloBufferFactor: must be > 0"),
                            ({"useEncoderCacheFeatures": True}, "not built yet"),
                            ({"contextTTL": "soon"}, "contextTTL")):
        with pytest.raises(PluginError, match=message):
            plugin("predicted-latency-producer", params)


def test_producer_headroom_and_validity_follow_the_reference():
    from epp.requestcontrol.producers.latency import LatencyFeatures
    from epp.requestcontrol.producers.latency.producer import _Candidate
    e = ep(1)
    c = _Candidate("default", LatencyFeatures(), 120.0, 8.0)
    p = plugin("predicted-latency-producer")
    i = p.judge(e, c, req(ttft_slo=100.0, tpot_slo=5.0))  # not streaming: TPOT neutral
    assert (i.ttft_headroom_ms, i.ttft_valid, i.tpot_headroom_ms, i.tpot_valid, i.valid) == (-20.0, False, 0, True,
                                                                                            False)
    i = p.judge(e, c, req())  # no SLO: headroom = -predicted, never valid
    assert (i.ttft_headroom_ms, i.ttft_valid) == (-120.0, False)
    s = plugin("predicted-latency-producer", {"streamingMode": True, "sloBufferFactor": 2.0,
                                              "endpointRoleLabel": "llm-d.ai/role"})
    i = s.judge(e, c, req(ttft_slo=200.0, tpot_slo=5.0))
    assert (i.ttft_headroom_ms, i.tpot_headroom_ms, i.tpot_valid, i.valid) == (80.0, 2.0, True, True)  # 5 x 2 - 8
    s.running.add(e, 3.0)  # a running request with a tighter TPOT SLO bounds the buffer: min(10, 6)
    i = s.judge(e, c, req(ttft_slo=200.0, tpot_slo=5.0))
    assert (i.tpot_headroom_ms, i.tpot_valid, i.dispatched_requests) == (-2.0, False, 1)
    prefill = ep(2, labels={"llm-d.ai/role": "prefill"})
    assert s.judge(prefill, c, req(ttft_slo=200.0, tpot_slo=5.0)).tpot_headroom_ms == 0.0
    assert s.judge(e, _Candidate("default", LatencyFeatures(), None, None), req()) is None


def law_ms(hw: str, waiting: int, tokens: int, prefix: float, kv: float) -> float:
    """A synthetic TTFT law: queueing + uncached prefill, slower on the older class, with a KV knee."""
    slow = 2.2 if hw == "a100" else 1.0
    base = (15.0 + 0.05 * tokens * (1 - prefix) + 40.0 * waiting) * slow
    return base * (1.0 + 3.0 * max(0.0, kv - 0.8))


def test_producer_learns_a_synthetic_latency_law_and_reports_its_error(monkeypatch):
    """Through the plugin's own hooks, in virtual time with inline training: after 3,000
    requests its predictions on fresh requests are within 12 % of the law on each class (with
    the default objective, mean: the typical latency under 5 % lognormal noise), and the error
    metrics say so."""
    monkeypatch.delenv("LATENCY_OBJECTIVE_TYPE", raising=False)
    clock, rng, metrics = Clock(), random.Random(5), PluginMetrics()
    p = build_plugin("predicted-latency-producer", None, None,
                     PluginHandle(clock=clock, rng=random.Random(1), metrics=metrics), "t")
    p.background_training = False
    pool = {"h100": ep(1, labels={"nvidia.com/gpu.product": "h100"}),
            "a100": ep(2, labels={"nvidia.com/gpu.product": "a100"})}

    def one(i: int, learn: bool) -> tuple[str, float, float]:
        hw = rng.choice(list(pool))
        waiting, tokens, prefix, kv = rng.randint(0, 6), rng.randint(50, 4000), rng.choice((0, 0.5)), rng.random()
        e = pool[hw]
        e.metrics = type(e.metrics)(waiting_queue_size=waiting, kv_cache_usage_percent=kv)
        c = CycleState()
        c.write(TOKENIZED_PROMPT, tokens)
        c.write(PREFIX_MATCH_INFO, PrefixCacheMatchInfo({e: int(prefix * 10)}, 10, 16, int(prefix * 10)))
        r = req(rid=f"r{i}", ttft_slo=1000.0)
        p.prepare_request_data(c, r, [e])
        truth = law_ms(hw, waiting, tokens, prefix, kv)
        pub = c.read(p.key)
        predicted = pub.endpoints[e].ttft_ms if e in pub.endpoints else math.nan
        if learn:
            p.pre_request(c, r, result(e))
            clock.now += truth * math.exp(rng.gauss(0, 0.05)) / 1000.0
            p.response_complete(r, ResponseInfo(status=200, completion_tokens=5), e)
        return hw, predicted, truth

    for i in range(3000):
        one(i, learn=True)
    assert p.trainer.runs >= 10
    errors = {hw: [] for hw in pool}
    for i in range(400):
        hw, predicted, truth = one(10_000 + i, learn=False)
        errors[hw].append(abs(predicted - truth) / truth)
    for hw, errs in errors.items():
        assert sum(errs) / len(errs) < 0.12, (hw, sum(errs) / len(errs))
    rows = {(r["class"], r["target"]): r for r in p.error_rows()}
    assert {("h100", "ttft"), ("a100", "ttft"), ("*", "ttft")} <= set(rows)
    assert rows[("a100", "ttft")]["mape"] < 0.15 and rows[("h100", "ttft")]["mape"] < 0.15
    text = generate_latest(metrics.registry).decode()
    assert 'llm_d_epp_latency_prediction_mape{endpoint_class="a100",plugin_name="predicted-latency-producer",' \
           'plugin_type="predicted-latency-producer",target="ttft"}' in text
    assert "llm_d_epp_latency_prediction_p90_abs_error_milliseconds{" in text
    assert 'llm_d_epp_request_predicted_ttft_seconds_count{model_name="m",plugin_name="predicted-latency-producer"' in text


def test_producer_forgets_requests_it_never_hears_back_from():
    clock = Clock()
    p = build_plugin("predicted-latency-producer", None, {"contextTTL": "10s"}, PluginHandle(clock=clock), "t")
    e = ep(1)
    for i in range(3):
        c = CycleState()
        p.prepare_request_data(c, req(rid=f"r{i}"), [e])
        p.pre_request(c, req(rid=f"r{i}"), result(e))
    assert p.running.count(e) == 3
    clock.now += 11
    c = CycleState()
    p.prepare_request_data(c, req(rid="late"), [e])
    p.pre_request(c, req(rid="late"), result(e))
    assert p.running.count(e) == 1 and list(p._tracked) == ["late"]  # noqa: SLF001
    p.response_complete(req(rid="late"), ResponseInfo(status=200), e)
    assert p.running.count(e) == 0


def test_producer_objective_follows_the_reference_servers_environment(monkeypatch):
    for name in ("LATENCY_OBJECTIVE_TYPE", "LATENCY_QUANTILE_ALPHA"):
        monkeypatch.delenv(name, raising=False)
    # unset: mean, what both reference charts deploy (on the predictor sidecars, not the picker)
    assert plugin("predicted-latency-producer").model.quantile is None
    monkeypatch.setenv("LATENCY_OBJECTIVE_TYPE", "quantile")  # the servers' code default: alpha 0.9
    assert plugin("predicted-latency-producer").model.quantile == 0.9
    monkeypatch.setenv("LATENCY_QUANTILE_ALPHA", "0.8")
    assert plugin("predicted-latency-producer").model.quantile == 0.8
    monkeypatch.setenv("LATENCY_OBJECTIVE_TYPE", "mean")
    assert plugin("predicted-latency-producer").model.quantile is None
    monkeypatch.setenv("LATENCY_OBJECTIVE_TYPE", "p90")  # the chart's config refuses to start, saying why
    with pytest.raises(ConfigError, match="LATENCY_OBJECTIVE_TYPE: must be 'quantile' or 'mean', got 'p90'"):
        load_plugin_set((CONFIGS / "llm-d-router-chart-latency-predictor.yaml").read_text())


def test_producer_counts_decode_tokens_in_flight_from_first_chunk_to_completion():
    clock = Clock()
    p = plugin("predicted-latency-producer", {"streamingMode": True, "contextTTL": "10s"}, clock=clock)
    p.background_training = False
    e, other = ep(1), ep(2)

    def dispatch(rid: str, tokens: int) -> None:
        c = CycleState()
        c.write(TOKENIZED_PROMPT, tokens)
        p.prepare_request_data(c, req(rid=rid), [e, other])
        p.pre_request(c, req(rid=rid), result(e))

    def decoding(endpoint) -> float:
        return p.features(CycleState(), req(rid="probe"), [endpoint])[endpoint].features.decode_tokens_in_flight

    dispatch("a", 300)
    dispatch("b", 500)
    assert decoding(e) == 0  # both still in prefill
    for _ in range(2):  # later chunks do not count again
        p.response_streaming(req(rid="a"), ResponseInfo(status=200), e)
    assert (decoding(e), decoding(other)) == (300, 0)
    p.response_streaming(req(rid="b"), ResponseInfo(status=200), e)
    assert decoding(e) == 800
    clock.now += 0.5
    p.response_complete(req(rid="a"), ResponseInfo(status=200, completion_tokens=10), e)
    assert decoding(e) == 500
    clock.now += 11  # b never completes: forgotten after contextTTL, and its tokens with it
    dispatch("c", 100)
    assert decoding(e) == 0
    p.response_streaming(req(rid="c"), ResponseInfo(status=200), e)
    p.endpoints_removed([e])
    assert decoding(e) == 0 and p._decode_tokens == {}  # noqa: SLF001


def test_producer_learns_ttft_at_the_first_chunk_in_streaming_mode():
    """streamingMode: the TTFT sample is learnt when the first chunk arrives (the reference's
    processFirstTokenForLatencyPrediction), not held back until the response completes; the
    completion adds only TPOT. Without streamingMode the whole latency is learnt at the end."""
    clock = Clock()
    p = plugin("predicted-latency-producer", {"streamingMode": True}, clock=clock)
    p.background_training = False
    e = ep(1)
    c = CycleState()
    c.write(TOKENIZED_PROMPT, 100)
    p.prepare_request_data(c, req(rid="a"), [e])
    p.pre_request(c, req(rid="a"), result(e))
    clock.now += 0.25
    p.response_streaming(req(rid="a"), ResponseInfo(status=200), e)
    assert p.model.pending == 1  # the TTFT sample, before the response completes
    clock.now += 0.5  # under the trainer's 1 s interval: nothing trained inline yet
    p.response_complete(req(rid="a"), ResponseInfo(status=200, completion_tokens=5), e)
    assert p.model.pending == 2  # + TPOT, and TTFT not twice
    p.model.train()
    assert p.model.samples("*", "ttft") == 1 and p.model.samples("*", "tpot") == 1
    q = plugin("predicted-latency-producer", {}, clock=clock)
    q.background_training = False
    q.prepare_request_data(c, req(rid="b"), [e])
    q.pre_request(c, req(rid="b"), result(e))
    q.response_streaming(req(rid="b"), ResponseInfo(status=200), e)
    assert q.model.pending == 0
    clock.now += 0.3
    q.response_complete(req(rid="b"), ResponseInfo(status=200, completion_tokens=5), e)
    assert q.model.pending == 1


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("fixture", ["gie-v1.5-chart-latency-predictor.yaml",
                                     "llm-d-router-chart-latency-predictor.yaml", "llm-d-predicted-latency.yaml"])
def test_reference_latency_configs_load_with_their_producers(fixture):
    ps = load_plugin_set((CONFIGS / fixture).read_text())
    assert {"predicted-latency-producer", "latency-scorer", "approx-prefix-cache-producer", "inflight-load-producer",
            "token-producer"} <= set(ps.plugins)
    if fixture != "llm-d-predicted-latency.yaml":
        assert {"slo-headroom-tier-filter", "latency-slo-admitter"} <= set(ps.plugins)


def test_producer_metric_families_are_the_references():
    """Streaming, with a TTFT SLO one producer's requests all miss: every family the reference's producer registers,
    with its type, labels and buckets (tests/fixtures/reference/metrics.txt); two instances on one
    registry share the families."""
    from tests.test_metrics_reference import assert_matches_reference, reference
    clock, metrics = Clock(), PluginMetrics()
    producers = [build_plugin("predicted-latency-producer", name, {"streamingMode": True},
                              PluginHandle(clock=clock, metrics=metrics), "t") for name in ("a", "b")]
    e = ep(1)
    for i, (p, ttft_slo) in enumerate(zip(producers * 100, [5.0, 500.0] * 100, strict=True)):  # "a" misses every TTFT SLO
        p.background_training = False
        c, r = CycleState(), req(rid=f"r{i}", ttft_slo=ttft_slo, tpot_slo=50.0)
        p.prepare_request_data(c, r, [e])
        p.pre_request(c, r, result(e))
        clock.now += 0.02
        p.response_streaming(r, ResponseInfo(status=200), e)
        clock.now += 0.1
        p.response_complete(r, ResponseInfo(status=200, completion_tokens=11), e)
    text = generate_latest(metrics.registry).decode()
    ours = {n for n, (*_, scope) in reference().items() if scope == "plugin:predicted-latency-producer"}
    assert assert_matches_reference(text, ours) == ours
    assert 'llm_d_epp_request_slo_violation_total{model_name="m",plugin_name="a",plugin_type=' \
           '"predicted-latency-producer",target_model_name="m",type="ttft"} 100.0' in text
    assert 'inference_objective_request_slo_violation_total{model_name="m",target_model_name="m",type="ttft"} ' \
           '100.0' in text
    assert 'llm_d_epp_inference_request_metric{model_name="m",plugin_name="b",plugin_type=' \
           '"predicted-latency-producer",target_model_name="m",type="tpot"} 0.01' in text  # 100 ms / 10 tokens


def test_producer_model_labels_are_capped():
    """Past MAX_MODEL_LABELS distinct model names, a request's model is counted under "other"."""
    from epp.requestcontrol.producers.latency.producer import MAX_MODEL_LABELS
    clock, metrics = Clock(), PluginMetrics()
    p = build_plugin("predicted-latency-producer", "a", {}, PluginHandle(clock=clock, metrics=metrics), "t")
    p.background_training = False
    e = ep(1)
    for i in range(MAX_MODEL_LABELS + 5):
        model = f"model-{i}"
        r = InferenceRequest(f"r{i}", model, model, "completions", "x" * 400, {})
        r.slo_ttft_ms = 5.0
        c = CycleState()
        p.prepare_request_data(c, r, [e])
        p.pre_request(c, r, result(e))
        clock.now += 0.1
        p.response_complete(r, ResponseInfo(status=200, completion_tokens=11), e)
    text = generate_latest(metrics.registry).decode()
    named = {line.split('model_name="')[1].split('"')[0]
             for line in text.splitlines() if line.startswith("llm_d_epp_request_slo_violation_total{")}
    assert named == {f"model-{i}" for i in range(MAX_MODEL_LABELS)} | {"other"}
