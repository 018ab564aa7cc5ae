"""disagg-profile-handler, its deciders and the role filters against the reference
(llm-d/llm-d-router pkg/epp/framework/plugins/scheduling/profilehandler/disagg/*.go,
filter/bylabel/roles.go): stage selection, headers, parameter forms and errors."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from epp.assembly import load_plugin_set
from epp.config import ConfigError
from epp.framework import CycleState, Endpoint, InferenceRequest, Metrics, PluginHandle, params_from_mapping
from epp.framework.datakeys import PREFIX_MATCH_INFO, TOKENIZED_PROMPT, PrefixCacheMatchInfo
from epp.framework.registry import plugin_class
from epp.scheduling.scheduler import SchedulingTrace
from tests.helpers import plugin_set_error

CONFIGS = Path(__file__).parent / "fixtures" / "reference" / "configs"
ROLE = "llm-d.ai/role"


def ep(i, role=None, address=None):
    return Endpoint(f"e{i}", address or f"10.0.0.{i}", 8000, labels={ROLE: role} if role else {},
                    metrics=Metrics(update_time=time.monotonic(), ok=True))


def req(prompt="hi", body=None, headers=None):
    return InferenceRequest("r1", "m", "m", "chat" if body else "completions", prompt, headers or {}, body=body)


def handle():
    return PluginHandle(rng=random.Random(1))


def build(params, plugins=None):
    """A handler built from YAML-like parameters (strictly parsed), with `plugins` in its handle."""
    cls = plugin_class("disagg-profile-handler")
    return cls("h", params_from_mapping(cls.Params, params, "parameters"), PluginHandle(plugins=plugins or {}))


def decider(type_name, params=None, name=None):
    cls = plugin_class(type_name)
    p = params_from_mapping(cls.Params, params, "parameters") if getattr(cls, "Params", None) else None
    return cls(name or type_name, p, handle())


PD = """
plugins:
- {type: queue-scorer}
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 100}}
- {type: always-disagg-multimodal-decider}
- {type: disagg-profile-handler, parameters: HANDLER}
- {type: prefill-filter}
- {type: decode-filter}
- {type: encode-filter}
- {type: max-score-picker}
- {name: two, type: max-score-picker, parameters: {maxNumOfEndpoints: 2}}
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]}
- {name: encode, plugins: [{pluginRef: encode-filter}, {pluginRef: two}]}
"""
NESTED = "{deciders: {prefill: prefix-based-pd-decider, encode: always-disagg-multimodal-decider}}"


def pool():
    return [ep(1, "prefill"), ep(2, "decode"), ep(3, "encode"), ep(4, "encode"), ep(5, "encode-prefill-decode")]


def run(text, request, endpoints):
    p = load_plugin_set(text, handle())
    trace = SchedulingTrace()
    _, result = p.run_cycle(request, endpoints, trace=trace)
    return result, [t.name for t in trace.profiles]


IMAGE_CHAT = {"model": "m", "messages": [{"role": "user", "content": [
    {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}


# --------------------------------------------------------------------------- stage selection and headers
def test_long_prompt_is_prefilled_apart_and_the_sidecar_gets_the_prefiller():
    eps = pool()[:4]  # one prefill, one decode, two encoders
    result, ran = run(PD.replace("HANDLER", NESTED), req("p" * 4000), eps)  # 1000 tokens, nothing cached
    assert ran == ["decode", "prefill"]  # text only: the encode decider says no
    assert result.primary_profile == "decode" and result.targets == [eps[1]]
    assert result.headers == {"x-prefiller-host-port": "10.0.0.1:8000"}
    assert "encode" not in result.profile_results


def test_short_prompt_stays_on_decode():
    result, ran = run(PD.replace("HANDLER", NESTED), req("s" * 200), pool())  # 50 tokens < 100
    assert ran == ["decode"] and result.headers == {} and list(result.profile_results) == ["decode"]


def test_multimodal_request_is_encoded_apart_on_every_picked_encoder():
    result, ran = run(PD.replace("HANDLER", NESTED), req("s" * 20, body=IMAGE_CHAT), pool())
    assert ran == ["decode", "encode"]  # short: no prefill stage
    # the reference joins every encode target (here the picker keeps two of the three encoders)
    hosts = result.headers["x-encoder-hosts-ports"].split(",")
    assert len(hosts) == 2 and set(hosts) <= {"10.0.0.3:8000", "10.0.0.4:8000", "10.0.0.5:8000"}
    assert "x-prefiller-host-port" not in result.headers


def test_encode_then_prefill_each_decider_asked_once():
    calls = []

    class Counting:
        type_name = "counting"

        def __init__(self, name, answer):
            self.name, self.answer = name, answer

        def disaggregate(self, cycle, request, decode_endpoint):
            calls.append((self.name, decode_endpoint.name))
            return self.answer

    for enc, pre in ((False, False), (True, False), (False, True), (True, True)):
        calls.clear()
        h = build({"deciders": {"prefill": "p", "encode": "e"}}, {"p": Counting("p", pre), "e": Counting("e", enc)})
        profiles = {n: object() for n in ("decode", "prefill", "encode")}
        cycle, results, order = CycleState(), {}, []
        dec = ep(2, "decode")
        while chosen := h.pick_profiles(cycle, req(), profiles, results):
            (name,) = chosen
            order.append(name)
            results[name] = type("R", (), {"targets": [dec if name == "decode" else ep(7, address="fd00::7")]})()
        assert order == ["decode"] + ["encode"] * enc + ["prefill"] * pre
        assert sorted(calls) == [("e", "e2"), ("p", "e2")]  # both asked, once, with the decode pick
        headers = h.process_results(cycle, req(), results).headers
        assert headers.get("x-prefiller-host-port") == ("[fd00::7]:8000" if pre else None)  # IPv6 bracketed
        assert headers.get("x-encoder-hosts-ports") == ("[fd00::7]:8000" if enc else None)


def test_no_decider_means_no_disaggregation():
    # the reference: "No deciders.prefill configured, P/D disaggregation disabled"
    result, ran = run(PD.replace("HANDLER", "{}"), req("p" * 40000, body=IMAGE_CHAT), pool())
    assert ran == ["decode"] and result.headers == {}


def test_failed_prefill_profile_falls_back_to_decode_only():
    text = PD.replace("HANDLER", "{deciders: {prefill: always}}").replace(
        "- {type: always-disagg-multimodal-decider}", "- {name: always, type: always-disagg-pd-decider}")
    result, ran = run(text, req(), [ep(2, "decode")])  # no prefill endpoint
    assert ran == ["decode", "prefill"] and result.targets[0].name == "e2" and result.headers == {}
    assert "prefill" not in result.profile_results


def test_failed_decode_fails_the_request():
    from epp.errors import InferenceError

    with pytest.raises(InferenceError):
        run(PD.replace("HANDLER", NESTED), req("p" * 4000), [ep(1, "prefill")])


def test_prefill_first_runs_prefill_then_decode():
    text = PD.replace("HANDLER", "{stageOrder: prefill_first}")
    result, ran = run(text, req("s"), pool())
    assert ran == ["prefill", "decode"]
    assert result.primary_profile == "decode" and result.headers["x-prefiller-host-port"] in (
        "10.0.0.1:8000", "10.0.0.5:8000")


@pytest.mark.parametrize("value, expected", [("", "decode-first"), ("Decode", "decode-first"),
                                             ("decode_first", "decode-first"), ("PREFILL-FIRST", "prefill-first"),
                                             ("prefill", "prefill-first")])
def test_stage_order_spellings(value, expected):
    assert build({"stageOrder": value}).stage_order == expected


# --------------------------------------------------------------------------- parameter forms and errors
@pytest.mark.parametrize("legacy", [
    "{deciderPluginName: prefix-based-pd-decider, encodeDeciderPluginName: always-disagg-multimodal-decider}",
    "{prefillDeciderPluginName: prefix-based-pd-decider, deciderPluginName: gone-but-yields,"
    " encodeDeciderPluginName: always-disagg-multimodal-decider, decodeProfile: decode, prefillProfile: prefill,"
    " encodeProfile: encode}",
])
def test_legacy_flat_form_routes_as_the_nested_form(legacy):
    for request in (req("p" * 4000), req("s" * 20, body=IMAGE_CHAT), req("s")):
        nested, ran_nested = run(PD.replace("HANDLER", NESTED), request, pool())
        flat, ran_flat = run(PD.replace("HANDLER", legacy), request, pool())
        assert ran_flat == ran_nested and flat.headers.keys() == nested.headers.keys()


def test_renamed_profiles_in_both_forms():
    renamed = PD.replace("name: decode,", "name: d,").replace("name: prefill,", "name: p,")
    nested = "{profiles: {decode: d, prefill: p}, deciders: {prefill: prefix-based-pd-decider}}"
    flat = "{decodeProfile: d, prefillProfile: p, deciderPluginName: prefix-based-pd-decider}"
    for params in (nested, flat):
        result, ran = run(renamed.replace("HANDLER", params), req("p" * 4000), pool())
        assert ran == ["d", "p"] and result.primary_profile == "d" and "x-prefiller-host-port" in result.headers


@pytest.mark.parametrize("params, expected", [
    # a decider is resolved when the handler is built (reference HandlerFactory): the message names the key
    ("{deciders: {prefill: gone}}", "plugins[3]: parameters.deciders.prefill: no pd-decider plugin named 'gone'"),
    ("{deciders: {encode: gone}}", "plugins[3]: parameters.deciders.encode: no pd-decider plugin named 'gone'"),
    ("{deciderPluginName: gone}", "plugins[3]: parameters.deciderPluginName: no pd-decider plugin named 'gone'"),
    ("{deciders: {prefill: queue-scorer}}", "plugins[3]: parameters.deciders.prefill: plugin 'queue-scorer' "
                                            "(type 'queue-scorer') is not a decider"),
    ("{deciders: {prefill: prefix-based-pd-decider}, decodeProfile: decode}",
     "plugins[3].parameters.decodeProfile: deprecated flat parameter beside the nested profiles/deciders"),
    ("{stageOrder: sideways}", "plugins[3].parameters.stageOrder: invalid stage order 'sideways'"),
    ("{stageOrder: prefill-first, deciders: {prefill: prefix-based-pd-decider}}",
     "plugins[3].parameters.deciders.prefill: a prefill decider is not supported in the prefill-first stage order"),
    ("{deciders: {prefill: prefix-based-pd-decider, extra: x}}", "plugins[3].parameters.deciders.extra: unknown"),
    ("{profiles: {decode: nope}}", "plugins[3].parameters.profiles.decode: no scheduling profile named 'nope'"),
    ("{decodeProfile: nope}", "plugins[3].parameters.decodeProfile: no scheduling profile named 'nope'"),
])
def test_parameter_errors_name_the_key(params, expected):
    assert expected in plugin_set_error(PD.replace("HANDLER", params))


def test_a_decider_declared_after_its_handler_is_an_error():
    text = PD.replace("HANDLER", NESTED).replace("- {type: always-disagg-multimodal-decider}\n", "").replace(
        "- {type: prefill-filter}", "- {type: prefill-filter}\n- {type: always-disagg-multimodal-decider}")
    with pytest.raises(ConfigError, match=r"deciders\.encode: no pd-decider plugin named 'always-disagg-multi"):
        load_plugin_set(text, handle())


def test_a_stage_with_a_decider_needs_its_profile():
    text = PD.replace("HANDLER", NESTED).replace(
        "- {name: encode, plugins: [{pluginRef: encode-filter}, {pluginRef: two}]}\n", "")
    with pytest.raises(ConfigError, match=r"plugins\[3\]\.parameters\.profiles\.encode: no scheduling profile"):
        load_plugin_set(text, handle())


def test_the_pd_guide_config_routes_disaggregated():
    text = (CONFIGS / "llm-d-pd-disaggregation.yaml").read_text()
    p = load_plugin_set(text, handle())
    eps = [ep(1, "prefill"), ep(2, "decode")]
    _, result = p.run_cycle(req("short"), eps)  # always-disagg-pd-decider
    assert result.targets == [eps[1]] and result.headers == {"x-prefiller-host-port": "10.0.0.1:8000"}


# --------------------------------------------------------------------------- deciders
def cycle_with(tokens, cached_blocks=None, block=16, endpoint=None):
    c = CycleState()
    if tokens is not None:
        c.write(TOKENIZED_PROMPT, tokens)
    if cached_blocks is not None:
        c.write(PREFIX_MATCH_INFO, PrefixCacheMatchInfo(matches={endpoint: cached_blocks} if cached_blocks else {},
                                                        total_blocks=100, block_size_tokens=block))
    return c


@pytest.mark.parametrize("params, tokens, cached_blocks, expected", [
    ({}, 100000, 0, False),  # the reference's default nonCachedTokens 0: never
    ({"nonCachedTokens": 100}, 99, 0, False),  # prompt shorter than the threshold
    ({"nonCachedTokens": 100}, 100, 0, True),  # P - C = 100 >= 100
    ({"nonCachedTokens": 100}, 200, 7, False),  # 200 - 7*16 = 88 < 100
    ({"nonCachedTokens": 100}, 212, 7, True),  # 212 - 112 = 100
    ({"nonCachedTokens": 100, "promptTokens": 500}, 499, 0, False),  # the prompt-length gate
    ({"nonCachedTokens": 100, "promptTokens": 500}, 500, 0, True),
    ({"nonCachedTokens": 100}, 100, None, False),  # no prefix state: no disaggregation (reference)
    ({"nonCachedTokens": 100}, None, 0, False),  # no token count: 0 tokens
])
def test_prefix_based_decider_formula(params, tokens, cached_blocks, expected):
    d = decider("prefix-based-pd-decider", params)
    target = ep(2, "decode")
    assert d.disaggregate(cycle_with(tokens, cached_blocks, endpoint=target), req(), target) is expected


def test_prefix_based_decider_defaults_and_bounds():
    d = decider("prefix-based-pd-decider")
    assert (d.non_cached_tokens, d.prompt_tokens) == (0, 0)  # reference defaults
    assert d.disaggregate(cycle_with(10**6, 0), req(), None) is False  # no decode endpoint
    for key in ("nonCachedTokens", "promptTokens"):
        with pytest.raises(ValueError, match=rf"parameters\.{key}: must be >= 0"):
            decider("prefix-based-pd-decider", {key: -1})


def test_prefix_based_decider_reads_the_named_producer():
    d = decider("prefix-based-pd-decider", {"nonCachedTokens": 10, "prefixMatchInfoProducerName": "mine"})
    target = ep(2)
    c = cycle_with(100, 0)  # the default producer says nothing cached ...
    c.write(PREFIX_MATCH_INFO.of("mine"), PrefixCacheMatchInfo({target: 6}, 7, 16))  # ... "mine": 96 cached
    assert d.disaggregate(c, req(), target) is False


@pytest.mark.parametrize("body, expected", [
    (IMAGE_CHAT, True),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     True),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}]}, True),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, True),  # responses
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, True),  # anthropic
    ({"messages": [{"role": "user", "content": "an image_url in text"}]}, False),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, False),
    ({"prompt": "x"}, False),
    (None, False),
    ({"messages": "garbage"}, False),
    ({"messages": [None, 3, {"content": [None, "x"]}]}, False),
])
def test_multimodal_decider(body, expected):
    assert decider("always-disagg-multimodal-decider").disaggregate(CycleState(), req(body=body), ep(2)) is expected


def test_always_disagg_pd_decider():
    assert decider("always-disagg-pd-decider").disaggregate(CycleState(), req(), ep(2)) is True


# --------------------------------------------------------------------------- role filters (roles.go)
@pytest.mark.parametrize("type_name, kept", [
    ("decode-filter", {None, "decode", "prefill-decode", "both", "encode-prefill-decode"}),
    ("prefill-filter", {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"}),
    ("encode-filter", {"encode", "encode-prefill", "encode-prefill-decode"}),
])
def test_role_filters(type_name, kept):
    roles = [None, "decode", "prefill", "encode", "prefill-decode", "encode-prefill", "encode-prefill-decode",
             "both", "other"]
    eps = [ep(i + 1, r) for i, r in enumerate(roles)]
    f = plugin_class(type_name)(type_name)
    assert {e.labels.get(ROLE) for e in f.filter(CycleState(), req(), eps)} == kept


# --------------------------------------------------------------------------- decision counters (metrics.go)
def test_decisions_are_counted_as_the_reference():
    from prometheus_client import generate_latest

    from epp.errors import InferenceError

    h = handle()
    p = load_plugin_set(PD.replace("HANDLER", NESTED), h)
    eps = pool()[:4]
    for request in (req("p" * 4000), req("s"), req("s"), req("s" * 20, body=IMAGE_CHAT)):
        p.run_cycle(request, eps)
    with pytest.raises(InferenceError):  # no decode endpoint: no decision counted
        p.run_cycle(req("s"), [ep(1, "prefill")])
    text = generate_latest(h.metrics.registry).decode()
    series = 'llm_d_epp_disagg_decision_total{decision_type="%s",model_name="m",plugin_name="disagg-profile-handler",' \
             'plugin_type="disagg-profile-handler"} %s'
    assert series % ("prefill-decode", "1.0") in text
    assert series % ("decode-only", "2.0") in text
    assert series % ("encode-decode", "1.0") in text
    assert 'llm_d_inference_scheduler_disagg_decision_total{decision_type="decode-only",model_name="m"} 2.0' in text


def test_decision_model_labels_are_bounded():
    from epp.scheduling.profiles.decisions import MAX_MODELS, DecisionCounters

    c = DecisionCounters()
    for i in range(MAX_MODELS + 10):
        c.record("h", "disagg-profile-handler", f"model-{i}", "decode-only")
    models = {k[2] for k in c.counts}
    assert len(models) == MAX_MODELS + 1 and c.counts[("h", "disagg-profile-handler", "other", "decode-only")] == 10


def test_decision_families_have_the_reference_shape():
    from prometheus_client.parser import text_string_to_metric_families

    rows = {}
    for line in (CONFIGS.parent / "metrics.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, kind, labels, *_ = line.split("\t")
            rows[name] = (kind, set(labels.split(",")))
    from prometheus_client import generate_latest

    h = handle()
    load_plugin_set(PD.replace("HANDLER", NESTED), h).run_cycle(req("s"), pool()[:4])
    families = {f.name + "_total": f for f in text_string_to_metric_families(generate_latest(h.metrics.registry).decode())
                if f.type == "counter"}
    for name in ("llm_d_epp_disagg_decision_total", "llm_d_inference_scheduler_disagg_decision_total"):
        kind, labels = rows[name]
        samples = [s for s in families[name].samples if s.name == name]
        assert kind == "counter" and samples and all(set(s.labels) == labels for s in samples)
