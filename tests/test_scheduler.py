"""Scheduler and pipeline: profile runs, weighted totals, errors, trace, commit=False, hooks."""

import random
import time

import pytest

from epp.assembly import load_plugin_set
from epp.errors import InferenceError
from epp.framework import Endpoint, InferenceRequest, Metrics, PluginHandle, ResponseInfo
from epp.framework.datakeys import PREFIX_MATCH_INFO
from epp.scheduling.scheduler import SchedulingTrace


def ep(name, queue=0, kv=0.0, **labels):
    return Endpoint(name, f"10.0.0.{int(name[1:])}", 8000, labels=labels,
                    metrics=Metrics(waiting_queue_size=queue, kv_cache_usage_percent=kv,
                                    update_time=time.monotonic(), ok=True))


def req(prompt="hello " * 100, rid="r1", **kw):
    return InferenceRequest(rid, "m", "m", "completions", prompt, kw.pop("headers", {}), **kw)


def handle(seed=1):
    return PluginHandle(rng=random.Random(seed))


def test_default_pipeline_picks_least_loaded_and_weights_sum():
    p = load_plugin_set(None, handle())
    eps = [ep("e1", queue=4, kv=0.5), ep("e2", queue=0, kv=0.1), ep("e3", queue=2, kv=0.9)]
    trace = SchedulingTrace()
    _, result = p.run_cycle(req(), eps, trace=trace)
    assert result.targets == [eps[1]]
    (pt,) = trace.profiles
    assert trace.primary_profile == "default" and pt.picked == ["e2"]
    scores = {s.name: (s.weight, s.scores) for s in pt.scorers}
    assert scores["queue-scorer"] == (2.0, {"e1": 0.0, "e2": 1.0, "e3": 0.5})
    assert scores["prefix-cache-scorer"][1] == {"e1": 0.0, "e2": 0.0, "e3": 0.0}
    # total = 2*queue + 2*(1-kv) + 3*prefix, no normalisation
    assert pt.totals["e2"] == pytest.approx(2 * 1.0 + 2 * 0.9)
    assert pt.totals["e3"] == pytest.approx(2 * 0.5 + 2 * 0.1)


def test_prefix_recorded_on_commit_and_wins_next_time():
    p = load_plugin_set(None, handle())
    eps = [ep("e1"), ep("e2"), ep("e3")]
    _, first = p.run_cycle(req(rid="a"), eps)
    chosen = first.targets[0]
    # Make the chosen endpoint slightly busier: prefix weight 3 must still win.
    chosen.metrics = Metrics(waiting_queue_size=1, kv_cache_usage_percent=0.2, update_time=time.monotonic(), ok=True)
    cycle, second = p.run_cycle(req(rid="b"), eps)
    assert second.targets == [chosen]
    assert cycle.read(PREFIX_MATCH_INFO).score(chosen) == 1.0


def test_commit_false_has_no_side_effects():
    p = load_plugin_set("""
plugins:
- type: prefix-cache-scorer
- type: active-request-scorer
- type: no-hit-lru-scorer
""", handle())
    eps = [ep("e1"), ep("e2")]
    for i in range(5):
        p.run_cycle(req(rid=f"x{i}"), eps, commit=False)
    assert len(p.plugins["approx-prefix-cache-producer"].index) == 0
    assert p.plugins["inflight-load-producer"].requests == {}  # what active-request-scorer reads
    assert not p.plugins["no-hit-lru-scorer"]._lru
    p.run_cycle(req(rid="y"), eps)
    assert len(p.plugins["approx-prefix-cache-producer"].index) > 0
    assert sum(p.plugins["inflight-load-producer"].requests.values()) == 1


def test_no_candidates_is_503_and_all_filtered_is_429():
    p = load_plugin_set("plugins: [{type: header-based-testing-filter}, {type: queue-scorer}]", handle())
    with pytest.raises(InferenceError) as e:
        p.run_cycle(req(), [])
    assert e.value.http_status == 503
    with pytest.raises(InferenceError) as e:
        p.run_cycle(req(headers={}), [ep("e1")])
    assert e.value.http_status == 429 and e.value.code == "ResourceExhausted"


def test_filter_chain_trace_and_failed_profile():
    p = load_plugin_set("""
plugins:
- type: decode-filter
- type: header-based-testing-filter
- type: queue-scorer
""", handle())
    eps = [ep("e1", **{"llm-d.ai/role": "prefill"}), ep("e2", **{"llm-d.ai/role": "decode"}), ep("e3")]
    trace = SchedulingTrace()
    _, result = p.run_cycle(req(headers={"test-epp-endpoint-selection": "10.0.0.3"}), eps, trace=trace)
    assert result.targets == [eps[2]]
    pt = trace.profiles[0]
    assert [(f.name, f.kept) for f in pt.filters] == [("decode-filter", ["e2", "e3"]),
                                                      ("header-based-testing-filter", ["e3"])]
    trace = SchedulingTrace()
    with pytest.raises(InferenceError):
        p.run_cycle(req(headers={"test-epp-endpoint-selection": "10.0.0.1"}), eps, trace=trace)
    assert trace.profiles[0].failed


class Wild:
    type_name = "test-wild-scorer"

    def __init__(self, name, params, handle):
        self.name = name

    def score(self, cycle, request, endpoints):
        return [5.0, -3.0, float("nan")][: len(endpoints)]


def test_scores_are_clamped():
    p = load_plugin_set(f"plugins: [{{type: '{__name__}:Wild'}}]", handle())
    trace = SchedulingTrace()
    _, result = p.run_cycle(req(), [ep("e1"), ep("e2"), ep("e3")], trace=trace)
    assert trace.profiles[0].totals == {"e1": 1.0, "e2": 0.0, "e3": 0.0}
    assert result.targets[0].name == "e1"


def test_observe_gets_every_extension_point():
    seen = []
    p = load_plugin_set("""
plugins:
- type: prefix-cache-scorer
- type: decode-filter
- type: session-affinity-scorer
""", handle(), observe=lambda point, ptype, name, secs: seen.append((point, ptype, name, secs >= 0)))
    eps = [ep("e1"), ep("e2")]
    _, result = p.run_cycle(req(), eps)
    info = ResponseInfo(status=200)
    p.response_received(req(), info, result.targets[0])
    points = {(s[0], s[2]) for s in seen}
    assert {("PrepareData", "approx-prefix-cache-producer"), ("Filter", "decode-filter"),
            ("Scorer", "prefix-cache-scorer"), ("Scorer", "session-affinity-scorer"),
            ("Picker", "max-score-picker"), ("PreRequest", "approx-prefix-cache-producer"),
            ("ResponseReceived", "session-affinity-scorer")} <= points
    assert all(s[3] for s in seen)
    assert "x-session-token" in info.set_headers


def test_endpoints_removed_purges_prefix_index():
    p = load_plugin_set(None, handle())
    eps = [ep("e1"), ep("e2")]
    _, r = p.run_cycle(req(), eps)
    idx = p.plugins["approx-prefix-cache-producer"].index
    assert idx.endpoint_size(r.targets[0]) > 0
    p.endpoints_removed([r.targets[0]])
    assert len(idx) == 0 and idx.endpoint_size(r.targets[0]) == 0


def test_saturation_uses_detector():
    p = load_plugin_set(None, handle())
    assert p.saturation([ep("e1", queue=10), ep("e2", queue=0)]) == pytest.approx((2.0 + 0.0) / 2)


PD_CONFIG = """
plugins:
- type: prefill-filter
- type: decode-filter
- type: prefix-cache-scorer
- type: queue-scorer
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 100}}
- {type: disagg-profile-handler, parameters: {deciders: {prefill: prefix-based-pd-decider}}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 3}, {pluginRef: queue-scorer}]
"""


def pd_pool():
    role = "llm-d.ai/role"
    return [ep("e1", **{role: "prefill"}), ep("e2", **{role: "decode"})]


def test_disagg_long_uncached_prompt_gets_prefill_endpoint():
    p = load_plugin_set(PD_CONFIG, handle())
    eps = pd_pool()
    trace = SchedulingTrace()
    _, result = p.run_cycle(req(prompt="p" * 4000), eps, trace=trace)  # 1000 tokens, none cached
    assert result.primary_profile == "decode" and result.targets == [eps[1]]
    assert result.headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    assert [t.name for t in trace.profiles] == ["decode", "prefill"]
    # prefix recorded on both decode and prefill endpoints; now mostly cached on decode
    _, again = p.run_cycle(req(prompt="p" * 4000 + "q" * 200), eps)
    assert again.headers == {}  # 1050 tokens - 1000 cached < 100
    _, short = p.run_cycle(req(prompt="s" * 200), eps)  # 50 tokens < 100
    assert short.headers == {} and list(short.profile_results) == ["decode"]


def test_disagg_always_decider_and_prefill_failure_falls_back():
    text = PD_CONFIG.replace("{type: prefix-based-pd-decider, parameters: {nonCachedTokens: 100}}",
                             "{type: always-disagg-pd-decider}").replace("prefill: prefix-based-pd-decider",
                                                                         "prefill: always-disagg-pd-decider")
    p = load_plugin_set(text, handle())
    _, result = p.run_cycle(req(prompt="s" * 10), pd_pool())
    assert result.headers["x-prefiller-host-port"] == "10.0.0.1:8000"
    _, only_decode = p.run_cycle(req(prompt="s" * 10), [pd_pool()[1]])  # no prefill endpoint
    assert only_decode.targets[0].name == "e2" and only_decode.headers == {}


def test_disagg_handler_needs_its_profiles():
    from epp.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\[2\]\.parameters\.prefillProfile: no scheduling profile"):
        load_plugin_set("plugins: [{type: queue-scorer}, {type: always-disagg-pd-decider}, {type: disagg-profile-handler,"
                        " parameters: {deciderPluginName: always-disagg-pd-decider}}]\n"
                      "schedulingProfiles: [{name: decode, plugins: [{pluginRef: queue-scorer}]}]", handle())


def test_conformance_config_routes_only_to_selected_endpoints():
    p = load_plugin_set("""
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: conformance-profile
  plugins: [{pluginRef: header-based-testing-filter}]
""", handle())
    eps = [ep(f"e{i}") for i in range(1, 6)]
    rng = random.Random(2)
    for i in range(100):
        chosen = rng.sample(eps, rng.randint(1, 3))
        header = ",".join(f"{e.address}:{e.port}" if i % 2 else e.address for e in chosen)
        _, result = p.run_cycle(req(rid=str(i), headers={"test-epp-endpoint-selection": header}), eps)
        assert result.targets[0] in chosen
        info = ResponseInfo(status=200, served_endpoint=result.targets[0].hostport)
        p.response_received(req(), info, result.targets[0])
        assert info.set_headers["x-conformance-test-served-endpoint"] == result.targets[0].hostport


def test_timing_helper_is_free_unobserved_and_reports_observed():
    from epp.timing import timed

    p = load_plugin_set(None, handle())
    scorer = p.plugins["queue-scorer"]
    assert timed("Scorer", scorer, scorer.score, None) == scorer.score  # the bound method itself: no wrapper
    seen = []
    call = timed("Scorer", scorer, scorer.score, lambda *a: seen.append(a))
    assert call(None, req(), [ep("e1", queue=1), ep("e2")]) == [0.0, 1.0]
    assert [s[:3] for s in seen] == [("Scorer", "queue-scorer", "queue-scorer")] and seen[0][3] >= 0
    # an observer set after assembly reaches every runner; unset, nothing is reported
    p.observe = lambda *a: seen.append(a)
    p.run_cycle(req(), [ep("e1"), ep("e2")])
    assert {s[0] for s in seen[1:]} == {"PrepareData", "Scorer", "Picker", "PreRequest"}
    p.observe = None
    n = len(seen)
    p.run_cycle(req(), [ep("e1"), ep("e2")])
    assert len(seen) == n
