"""The reference's current EndpointPickerConfig schema (llm-d/llm-d-router apix/config/v1alpha1
and pkg/epp/config/loader): its fixtures, apiVersions, featureGates, dataLayer,
requestHandler/parser, flowControl, implicit defaults, deprecated aliases and Alpha gating."""

from __future__ import annotations

import logging
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from epp.assembly import load_plugin_set
from epp.config import ConfigError, check_stability, load_config
from epp.framework.registry import PluginError, plugin_class
from tests.helpers import errmsg

CONFIGS = Path(__file__).parent / "fixtures" / "reference" / "configs"


def has_param(type_name: str, param: str) -> bool:
    try:
        cls = plugin_class(type_name)
    except PluginError:
        return False
    params = getattr(cls, "Params", None)
    return is_dataclass(params) and param in {f.name for f in fields(params)}


PARSERS = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")




# --------------------------------------------------------------------------- the fixtures
CHART_DEFAULTS = ["llm-d-router-chart-gateway.yaml", "llm-d-router-chart-standalone.yaml",
                  "gie-v1.5-chart-default.yaml"]


@pytest.mark.parametrize("fixture", CHART_DEFAULTS)
def test_chart_default_configs_load_with_the_reference_defaults(fixture):
    cfg = load_config((CONFIGS / fixture).read_text())
    (prof,) = cfg.scheduling_profiles
    assert [(r.plugin_ref, r.weight) for r in prof.plugins] == [
        ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0),
        ("max-score-picker", 1.0)]
    assert cfg.profile_handler == "single-profile-handler" and cfg.saturation_detector == "utilization-detector"
    assert cfg.parsers == list(PARSERS)  # no requestHandler: the reference's four, passthrough last
    (source,) = cfg.data_layer.sources  # no dataLayer: the configured source and extractor are wired
    assert (source.plugin_ref, source.extractors, source.implicit) == (
        "metrics-data-source", ["core-metrics-extractor"], True)
    assert cfg.plugin("metrics-data-source").parameters == {"scheme": "http", "path": "/metrics",
                                                            "insecureSkipVerify": True}
    assert not cfg.plugin("metrics-data-source").implicit  # the configured one, not a second instance
    assert [p.name for p in cfg.plugins].count("metrics-data-source") == 1


def test_payload_agnostic_config_loads_with_only_its_parser():
    cfg = load_config((CONFIGS / "llm-d-router-chart-payload-agnostic.yaml").read_text())
    assert cfg.parsers == ["passthrough-parser"]
    refs = [r.plugin_ref for r in cfg.scheduling_profiles[0].plugins]
    assert refs == ["active-request-scorer", "session-affinity-scorer", "max-score-picker"]
    # session-affinity-scorer is Alpha in the reference: its own chart needs --allow-experimental-plugins
    with pytest.raises(ConfigError, match="session-affinity-scorer.*--allow-experimental-plugins"):
        check_stability(cfg, False)
    check_stability(cfg, True)


def test_optimized_baseline_loads():
    cfg = load_config((CONFIGS / "llm-d-optimized-baseline.yaml").read_text())
    assert cfg.plugin("approx-prefix-cache-producer").parameters["maxPrefixTokensToMatch"] == 40960
    assert [r.plugin_ref for r in cfg.scheduling_profiles[0].plugins][:2] == [
        "prefix-cache-affinity-filter", "token-load-scorer"]
    # maxTTFTPenaltyMs: 0 (always stick) is what the filter here does; it is consumed, not passed on
    assert "maxTTFTPenaltyMs" not in cfg.plugin("prefix-cache-affinity-filter").parameters or \
        has_param("prefix-cache-affinity-filter", "maxTTFTPenaltyMs")


def test_every_fixture_is_covered():
    covered = {*CHART_DEFAULTS, "llm-d-router-chart-payload-agnostic.yaml", "llm-d-optimized-baseline.yaml",
               "llm-d-flow-control.yaml", "llm-d-pd-disaggregation.yaml", "llm-d-wide-ep-lws.yaml",
               "llm-d-precise-prefix-cache.yaml", "llm-d-router-sim-kvcache.yaml", "llm-d-predicted-latency.yaml",
               "llm-d-router-chart-latency-predictor.yaml", "gie-v1.5-chart-latency-predictor.yaml",
               "sim-program-aware-config.yaml"}  # tests/test_program_aware_fairness.py
    assert {p.name for p in CONFIGS.glob("*.yaml")} == covered


def test_flow_control_guide_loads_with_the_default_policies():
    # Every flow-control setting of the guide is a reference default the queues here implement
    # (global-strict fairness, FCFS, static usage limit); non-default policies name issue 11.
    cfg = load_config((CONFIGS / "llm-d-flow-control.yaml").read_text())
    assert cfg.feature_gates == {"flowControl"} and cfg.flow_control is not None


# --------------------------------------------------------------------------- apiVersion, featureGates
@pytest.mark.parametrize("version", ["llm-d.ai/v1alpha1", "llm-d.ai/v1", "inference.networking.x-k8s.io/v1alpha1"])
def test_api_versions(version, caplog):
    with caplog.at_level(logging.WARNING, logger="epp.config"):
        cfg = load_config(f"apiVersion: {version}\nkind: EndpointPickerConfig\nplugins: [{{type: queue-scorer}}]\n")
    assert cfg.api_version == version
    deprecations = [r for r in caplog.records if "apiVersion" in r.getMessage()]
    assert len(deprecations) == (1 if version.startswith("inference.networking") else 0)


@pytest.mark.parametrize("gates, enabled, flow", [
    ("[flowControl]", {"flowControl"}, True),
    ("[flowControl=true]", {"flowControl"}, True),
    ("['flowControl=False']", set(), False),
    ("['flowControl= T ']", {"flowControl"}, True),
    ("['haPopulateNonLeaderDatastore=true']", {"haPopulateNonLeaderDatastore"}, False),
    ("[]", set(), False),
])
def test_feature_gate_syntaxes(gates, enabled, flow):
    cfg = load_config(f"featureGates: {gates}\n")
    assert cfg.feature_gates == enabled
    assert (cfg.flow_control is not None) == flow
    assert cfg.gates["haPopulateNonLeaderDatastore"] is True  # registered default
    assert cfg.gates["flowControl"] is flow


def test_flow_control_section_without_the_gate_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="epp.config"):
        cfg = load_config("flowControl: {maxBytes: 1Gi}\n")
    assert any("flowControl feature gate is off" in r.getMessage() for r in caplog.records)
    from epp.flowcontrol.admission import gated_flow_control
    assert gated_flow_control(cfg.feature_gates, cfg.flow_control) is None


# --------------------------------------------------------------------------- saturation detector
DETECTORS = ("plugins:\n- {name: a, type: utilization-detector, parameters: {queueDepthThreshold: 3}}\n"
             "- {name: b, type: utilization-detector, parameters: {queueDepthThreshold: 7}}\n")


def test_saturation_detector_under_flow_control_wins_over_the_top_level(caplog):
    with caplog.at_level(logging.WARNING, logger="epp.config"):
        cfg = load_config(DETECTORS + "saturationDetector: {pluginRef: a}\n"
                          "flowControl: {saturationDetector: {pluginRef: b}}\n")
    assert cfg.saturation_detector == "b"
    assert sum("top-level saturationDetector is deprecated" in r.getMessage() for r in caplog.records) == 1


def test_top_level_saturation_detector_still_read():
    assert load_config(DETECTORS + "saturationDetector: {pluginRef: a}\n").saturation_detector == "a"


def test_saturation_detector_default_is_the_plugin_named_utilization_detector():
    # reference: pluginRef defaults to "utilization-detector", instantiated when no plugin has that name
    cfg = load_config(DETECTORS)
    assert cfg.saturation_detector == "utilization-detector" and cfg.plugin("utilization-detector").implicit
    assert load_config("flowControl: {saturationDetector: {pluginRef: ''}}").saturation_detector == \
        "utilization-detector"  # an empty pluginRef is the default too
    cfg = load_config("plugins: [{type: utilization-detector, parameters: {queueDepthThreshold: 3}}]\n")
    assert cfg.saturation_detector == "utilization-detector"
    assert cfg.plugin("utilization-detector").parameters == {"queueDepthThreshold": 3}


def test_flow_control_saturation_detector_errors():
    assert "flowControl.saturationDetector.pluginRef: no plugin named 'gone'" in errmsg(
        "flowControl: {saturationDetector: {pluginRef: gone}}")
    assert "flowControl.saturationDetector.queueDepthThreshold: unknown key" in errmsg(
        "flowControl: {saturationDetector: {queueDepthThreshold: 3}}")


# --------------------------------------------------------------------------- flowControl keys
def test_flow_control_keys_honoured():
    cfg = load_config("""
featureGates: [flowControl]
flowControl:
  maxBytes: 2Gi
  maxRequests: 0
  defaultRequestTTL: 30s
  noEndpointRequestTTL: 30s
  usageLimitPolicyPluginRef: static-usage-limit-policy
  enableEviction: false
  defaultPriorityBand: {maxBytes: 1Mi, maxRequests: 1k, fairnessPolicyRef: global-strict-fairness-policy,
                        orderingPolicyRef: fcfs-ordering-policy}
  defaultNegativePriorityBand: {maxRequests: 3}
  priorityBands: [{priority: 10, maxRequests: 5}]
""")
    fc = cfg.flow_control
    assert (fc.max_bytes, fc.default_request_ttl) == (2 * 2**30, 30.0)
    assert (fc.band(10).max_requests, fc.band(10).max_bytes) == (5, 1_000_000_000)  # listed band: own values
    assert (fc.band(4).priority, fc.band(4).max_bytes, fc.band(4).max_requests) == (4, 2**20, 1000)
    assert (fc.band(-2).priority, fc.band(-2).max_requests) == (-2, 3)


def test_flow_control_policies_limits_and_ttls_resolved():
    """Global maxRequests, noEndpointRequestTTL and the policy references as the reference's
    apix/config/v1alpha1 FlowControlConfig: band maxRequests/maxBytes "0" or unset = 5000 /
    1G (flowcontrol/registry/config.go), noEndpointRequestTTL unset follows defaultRequestTTL,
    undeclared default policies are added under their type names (config/loader/defaults.go)."""
    cfg = load_config("""
featureGates: [flowControl]
plugins:
- {type: round-robin-fairness-policy, name: rr}
- {type: static-usage-limit-policy, name: limit, parameters: {threshold: 0.8}}
flowControl:
  maxRequests: 2k
  defaultRequestTTL: 30s
  usageLimitPolicyPluginRef: limit
  priorityBands:
  - {priority: 1, fairnessPolicyRef: rr, orderingPolicyRef: edf-ordering-policy, maxRequests: 0}
""")
    fc = cfg.flow_control
    assert (fc.max_requests, fc.max_bytes, fc.endpointless_ttl) == (2000, 0, 30.0)
    band = fc.band(1)
    assert (band.fairness_policy_ref, band.ordering_policy_ref, band.max_requests, band.max_bytes) == (
        "rr", "edf-ordering-policy", 5000, 1_000_000_000)
    assert (fc.band(3).fairness_policy_ref, fc.band(3).ordering_policy_ref, fc.band(3).max_requests) == (
        "global-strict-fairness-policy", "fcfs-ordering-policy", 5000)
    assert fc.usage_limit_policy_ref == "limit" and cfg.plugin("limit").parameters == {"threshold": 0.8}
    implicit = {p.type for p in cfg.plugins if p.implicit}
    assert {"edf-ordering-policy", "global-strict-fairness-policy", "fcfs-ordering-policy"} <= implicit
    assert "static-usage-limit-policy" not in implicit  # declared as "limit"
    split = load_config("featureGates: [flowControl]\nflowControl: {noEndpointRequestTTL: 5m}\n").flow_control
    assert (split.default_request_ttl, split.endpointless_ttl) == (60.0, 300.0)
    # without defaultNegativePriorityBand, negative priorities fall back to defaultPriorityBand
    only_default = load_config("featureGates: [flowControl]\nflowControl: {defaultPriorityBand: {maxRequests: 7}}\n")
    assert only_default.flow_control.band(-3).max_requests == 7


# --------------------------------------------------------------------------- requestHandler / parser
def test_request_handler_parsers_in_order_and_instantiated_by_type():
    cfg = load_config("plugins: [{name: p, type: passthrough-parser}]\n"
                      "requestHandler: {parsers: [{pluginRef: anthropic-parser}, {pluginRef: p}]}\n")
    assert cfg.parsers == ["anthropic-parser", "p"]
    assert cfg.plugin("anthropic-parser").implicit and cfg.plugin("anthropic-parser").type == "anthropic-parser"
    assert "openai-parser" not in {p.name for p in cfg.plugins}


def test_deprecated_parser_is_mapped_and_the_new_field_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="epp.config"):
        old = load_config("parser: {pluginRef: vllmhttp-parser}\n")
        both = load_config("parser: {pluginRef: vllmhttp-parser}\n"
                           "requestHandler: {parsers: [{pluginRef: openai-parser}]}\n")
    assert old.parsers == ["vllmhttp-parser"]
    assert both.parsers == ["openai-parser"] and "vllmhttp-parser" not in {p.name for p in both.plugins}
    assert sum("top-level parser is deprecated" in r.getMessage() for r in caplog.records) == 2


# --------------------------------------------------------------------------- dataLayer
def test_data_layer_defaults_are_injected_unless_opted_out():
    cfg = load_config("plugins: [{type: queue-scorer}]\n")
    (source,) = cfg.data_layer.sources
    assert source.implicit and cfg.plugin("metrics-data-source").implicit
    assert cfg.plugin("core-metrics-extractor").implicit
    off = load_config("plugins: [{type: queue-scorer}]\ndataLayer: {injectDefaults: false}\n")
    assert off.data_layer.sources == [] and "metrics-data-source" not in {p.name for p in off.plugins}


def test_data_layer_sources_and_extractors_as_written():
    cfg = load_config("""
plugins:
- {name: scrape, type: metrics-data-source, parameters: {path: /m}}
- {name: ex, type: core-metrics-extractor}
dataLayer:
  sources: [{pluginRef: scrape, extractors: [{pluginRef: ex}]}]
""")
    # a source not named metrics-data-source: the reference still injects its default one
    assert [(s.plugin_ref, s.extractors, s.implicit) for s in cfg.data_layer.sources] == [
        ("scrape", ["ex"], False), ("metrics-data-source", ["core-metrics-extractor"], True)]


# --------------------------------------------------------------------------- deprecated aliases
def test_by_label_maps_to_label_selector_filter_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="epp.config"):
        cfg = load_config("""
plugins:
- {name: gpu, type: by-label, parameters: {label: hw, validValues: [a100, h100]}}
- {name: unlabelled, type: by-label, parameters: {label: hw, allowsNoLabel: true}}
- {name: sel, type: by-label-selector, parameters: {matchLabels: {zone: a}}}
""")
    gpu, unlabelled, sel = (cfg.plugin(n) for n in ("gpu", "unlabelled", "sel"))
    assert (gpu.type, gpu.alias) == ("label-selector-filter", "by-label")
    assert gpu.parameters == {"matchExpressions": [{"key": "hw", "operator": "In", "values": ["a100", "h100"]}]}
    assert unlabelled.parameters == {"matchExpressions": [{"key": "hw", "operator": "DoesNotExist"}]}
    assert (sel.type, sel.parameters) == ("label-selector-filter", {"matchLabels": {"zone": "a"}})
    warnings = [r.getMessage() for r in caplog.records if "DEPRECATION: plugin type" in r.getMessage()]
    assert len(warnings) == 2  # one per deprecated type, not per plugin
    assert any("'by-label'" in w and "'label-selector-filter'" in w for w in warnings)
    # the mapped filter behaves as by-label did
    from epp.framework import Endpoint
    ps = load_plugin_set("plugins:\n- {name: gpu, type: by-label, parameters: {label: hw, validValues: [a100]}}\n")
    f = ps.plugins["gpu"]
    eps = [Endpoint(name=n, address="10.0.0.1", port=8000, labels=lb) for n, lb in
           (("x", {"hw": "a100"}), ("y", {"hw": "t4"}), ("z", {}))]
    assert [e.name for e in f.filter(None, None, eps)] == ["x"]


@pytest.mark.parametrize("params, expected", [
    ("{validValues: [a]}", "plugins[0].parameters.label: required"),
    ("{label: hw}", "plugins[0].parameters: either validValues must be non-empty or allowsNoLabel must be true"),
    ("{label: hw, validValues: [a], allowsNoLabel: true}", "plugins[0].parameters.allowsNoLabel: true together"),
    ("{label: hw, values: [a]}", "plugins[0].parameters.values: unknown key"),
])
def test_by_label_parameter_errors(params, expected):
    assert expected in errmsg(f"plugins: [{{type: by-label, parameters: {params}}}]")


PD = """
plugins:
- type: prefix-based-pd-decider
- {type: pd-profile-handler, parameters: {prefixPluginName: prefix-based-pd-decider}}
- {type: prefill-header-handler, parameters: {prefillProfile: prefill}}
- type: decode-filter
- type: prefill-filter
schedulingProfiles:
- {name: decode, plugins: [{pluginRef: decode-filter}]}
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
"""


def test_pd_profile_handler_maps_to_disagg_profile_handler(caplog):
    with caplog.at_level(logging.WARNING, logger="epp.config"):
        cfg = load_config(PD)
    handler = cfg.plugin("pd-profile-handler")
    assert (handler.type, handler.alias) == ("disagg-profile-handler", "pd-profile-handler")
    assert handler.parameters == {"deciderPluginName": "prefix-based-pd-decider"}  # the reference's default decider
    assert cfg.profile_handler == "pd-profile-handler"
    # the headers handler only wrote x-prefiller-host-port, which the profile handler writes: absorbed
    assert "prefill-header-handler" not in {p.name for p in cfg.plugins}
    assert sum("DEPRECATION: plugin type" in r.getMessage() for r in caplog.records) == 2
    load_plugin_set(PD)  # builds: profiles and decider found


@pytest.mark.parametrize("change, expected", [
    ("{prefixPluginName: prefix-based-pd-decider}", None),
    ("{prefixPluginName: nope}", "plugins[1].parameters.prefixPluginName: no plugin named 'nope'"),
    ("{primaryPort: 8000}", "plugins[1].parameters.primaryPort: the data-parallel primary port needs"),
    ("{deciderPluginName: gone}", "deciderPluginName: no pd-decider plugin named 'gone'"),
])
def test_pd_profile_handler_parameters(change, expected):
    text = PD.replace("{prefixPluginName: prefix-based-pd-decider}", change)
    if expected is None:
        load_plugin_set(text)
        return
    with pytest.raises(ConfigError) as e:
        load_plugin_set(text)
    assert expected in str(e.value)


def test_headers_handler_refusals():
    other_prefill = PD.replace("{prefillProfile: prefill}", "{prefillProfile: pre}")
    assert "plugins[2].parameters.prefillProfile: 'pre' differs from the prefill profile 'prefill'" in errmsg(
        other_prefill)
    with_encode = PD + "- {name: encode, plugins: [{pluginRef: prefill-filter}]}\n"
    assert "plugins[2].parameters.encodeProfile: the encode stage (profile 'encode') needs disaggregated " \
           "serving" in errmsg(with_encode)


def test_tokenizer_alias_names_its_replacement():
    text = "plugins: [{type: tokenizer, parameters: {modelName: m}}]\n"
    assert load_config("plugins: [{type: tokenizer}]\n").plugin("tokenizer").type == "token-producer"
    # a model name alone selects the reference's vllm /render backend (tests/test_tokenization.py)
    assert load_config(text).plugin("tokenizer").type == "token-producer"


# --------------------------------------------------------------------------- stability, other issues' types
def test_alpha_plugins_need_allow_experimental_plugins():
    text = "plugins: [{type: queue-scorer}, {name: sticky, type: session-affinity-scorer}]\n"
    with pytest.raises(ConfigError) as e:
        load_plugin_set(text, allow_experimental_plugins=False)
    assert str(e.value) == ("plugins[1].type: plugin 'sticky' (type: 'session-affinity-scorer') has Alpha "
                            "stability level, but command line flag --allow-experimental-plugins is not set")
    assert "sticky" in load_plugin_set(text, allow_experimental_plugins=True).plugins
    load_plugin_set("plugins: [{type: queue-scorer}]\n", allow_experimental_plugins=False)  # Beta: fine


@pytest.mark.parametrize("ptype, feature", [
    ("mm-embeddings-cache-scorer", "precise prefix-cache routing (issue 12)"),
])
def test_types_of_other_issues_are_refused_naming_the_feature(ptype, feature):
    assert f"plugins[1].type: plugin type {ptype!r} needs {feature}, not built yet" in errmsg(
        f"plugins: [{{type: queue-scorer}}, {{type: {ptype}}}]")


def test_disagg_stage_order_is_checked_not_refused():
    # disagg-profile-handler's stageOrder is built (tests/test_profiles_disagg.py): checked, not refused
    assert "plugins[0].parameters.stageOrder: expected a string" in errmsg(
        "plugins: [{type: disagg-profile-handler, parameters: {stageOrder: [prefill, decode]}}]")
