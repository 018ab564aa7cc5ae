"""EndpointPickerConfig parsing: the reference format, defaults, and errors naming the key."""

import pytest

from epp.config import ConfigError, load_config, parse_duration, parse_quantity
from tests.helpers import errmsg

REFERENCE_EXAMPLE = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 16, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- {name: picker, type: max-score-picker, parameters: {maxNumOfEndpoints: 1}}
- type: utilization-detector
  parameters: {queueDepthThreshold: 5, kvCacheUtilThreshold: 0.8}
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: picker}
saturationDetector: {pluginRef: utilization-detector}
flowControl: {maxBytes: 10Gi, defaultRequestTTL: 60s,
              priorityBands: [{priority: 100, maxBytes: 5Gi, maxRequests: 500}]}
"""


def test_reference_example_parses_exactly():
    cfg = load_config(REFERENCE_EXAMPLE)
    assert cfg.feature_gates == {"flowControl"}
    assert [p.name for p in cfg.plugins if not p.implicit] == [
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "picker", "utilization-detector"]
    # v1.5 format: the matching parameters move to an implicit producer the scorer reads
    producer = cfg.plugin("approx-prefix-cache-producer")
    assert producer.implicit and producer.type == "approx-prefix-cache-producer"
    assert producer.parameters == {"blockSizeTokens": 16, "maxPrefixBlocksToMatch": 256, "lruCapacityPerServer": 31250,
                                   "legacyV15": True}  # v1.5 form: v1.5's matching semantics
    assert cfg.plugin("prefix-cache-scorer").parameters == {"prefixMatchInfoProducerName": "approx-prefix-cache-producer"}
    (prof,) = cfg.scheduling_profiles
    assert [(r.plugin_ref, r.weight) for r in prof.plugins] == [
        ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0), ("picker", 1.0)]
    assert cfg.saturation_detector == "utilization-detector"
    assert cfg.profile_handler == "single-profile-handler"
    fc = cfg.flow_control
    assert fc.max_bytes == 10 * 2**30 and fc.default_request_ttl == 60.0
    band = fc.band(100)
    assert (band.max_bytes, band.max_requests) == (5 * 2**30, 500)
    assert fc.band(7).max_bytes == 1_000_000_000  # unlisted band: defaults


def test_llmd_api_version_accepted():
    cfg = load_config("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: [{type: queue-scorer}]\n")
    assert cfg.api_version == "llm-d.ai/v1alpha1"


def test_no_file_defaults():
    for text in (None, "", "  \n"):
        cfg = load_config(text)
        (prof,) = cfg.scheduling_profiles
        assert prof.name == "default"
        assert [(r.plugin_ref, r.weight) for r in prof.plugins] == [
            ("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0),
            ("max-score-picker", 1.0)]
        assert cfg.profile_handler == "single-profile-handler"
        assert cfg.saturation_detector == "utilization-detector"
        assert cfg.flow_control is None


def test_no_profiles_gives_default_profile_with_every_filter_scorer_picker():
    cfg = load_config("""
plugins:
- type: decode-filter
- type: queue-scorer
- {type: random-picker, name: rp}
- type: utilization-detector
""")
    (prof,) = cfg.scheduling_profiles
    assert prof.name == "default"
    # utilization-detector is a filter too; every scorer gets weight 1
    assert [(r.plugin_ref, r.weight) for r in prof.plugins] == [
        ("decode-filter", 1.0), ("queue-scorer", 1.0), ("rp", 1.0), ("utilization-detector", 1.0)]
    assert cfg.saturation_detector == "utilization-detector"


def test_profile_without_picker_gets_max_score_picker():
    cfg = load_config("""
plugins: [{type: queue-scorer}]
schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: 5}]}]
""")
    refs = cfg.scheduling_profiles[0].plugins
    assert refs[-1].plugin_ref == "max-score-picker"
    assert cfg.plugin("max-score-picker").type == "max-score-picker"


def test_flow_control_gate_without_section_gets_defaults():
    cfg = load_config("featureGates: [flowControl]\nplugins: [{type: queue-scorer}]\n")
    assert cfg.flow_control is not None and cfg.flow_control.default_request_ttl == 60.0


def test_legacy_inline_saturation_detector_thresholds():
    cfg = load_config("plugins: [{type: queue-scorer}]\nsaturationDetector: {queueDepthThreshold: 9}\n")
    spec = cfg.plugin(cfg.saturation_detector)
    assert spec.type == "utilization-detector" and spec.parameters == {"queueDepthThreshold": 9}


def test_conformance_style_config():
    cfg = load_config("""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: conformance-profile
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: destination-endpoint-served-verifier
""")
    refs = [r.plugin_ref for r in cfg.scheduling_profiles[0].plugins]
    assert refs == ["header-based-testing-filter", "destination-endpoint-served-verifier", "max-score-picker"]
    assert cfg.profile_handler == "single-profile-handler"


def test_engine_metrics_kept_raw():
    cfg = load_config("engineMetrics: {sglang: {waiting: 'sglang:num_queue_reqs'}}\n")
    assert cfg.engine_metrics == {"sglang": {"waiting": "sglang:num_queue_reqs"}}


def test_quantities_and_durations():
    assert parse_quantity("10Gi", "k") == 10 * 2**30
    assert parse_quantity("5G", "k") == 5 * 10**9
    assert parse_quantity("1.5Ki", "k") == 1536
    assert parse_quantity(1e9, "k") == 10**9
    assert parse_quantity("1e9", "k") == 10**9
    assert parse_duration("60s", "k") == 60.0
    assert parse_duration("1m30s", "k") == 90.0
    assert parse_duration("200ms", "k") == pytest.approx(0.2)
    assert parse_duration(2, "k") == 2.0
    with pytest.raises(ConfigError, match="^k: "):
        parse_quantity("-1", "k")
    with pytest.raises(ConfigError, match="^k: "):
        parse_duration("5 s", "k")


def test_prefix_producer_wiring_old_and_new_formats():
    # new format: the producer is configured; the scorer only names it; nothing implicit added
    cfg = load_config("""
plugins:
- {type: approx-prefix-cache-producer, name: pp, parameters: {blockSizeTokens: 32}}
- {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: pp}}
- {type: no-hit-lru-scorer, parameters: {prefixMatchInfoProducerName: pp}}
""")
    assert [p.type for p in cfg.plugins if p.type.startswith("approx")] == ["approx-prefix-cache-producer"]
    assert cfg.plugin("prefix-cache-scorer").parameters == {"prefixMatchInfoProducerName": "pp"}
    # v1.5: two scorers with different matching parameters get one producer each, placed before
    # them; the v1.5 consumer parameter prefixPluginName (a scorer's name) now names its producer
    cfg = load_config("""
plugins:
- {type: prefix-cache-affinity-filter, parameters: {prefixPluginName: p2}}
- {type: prefix-cache-scorer, name: p1}
- {type: prefix-cache-scorer, name: p2, parameters: {blockSize: 64, autoTune: false}}
- {type: prefix-cache-scorer, name: p3}
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 10, prefixPluginName: p1}}
""")
    names = [p.name for p in cfg.plugins]
    # the filter reads in-flight load (maxTTFTPenaltyMs): its producer and the token count it needs
    # are added as the reference adds default producers; producers run after those they read
    # (the decider reads the token count too: token-producer comes in for it, after the prefix producer)
    assert names[:8] == ["approx-prefix-cache-producer", "token-producer", "inflight-load-producer",
                         "prefix-cache-affinity-filter", "p1", "approx-prefix-cache-producer-2", "p2", "p3"]
    assert cfg.plugin("approx-prefix-cache-producer").parameters == {}
    assert cfg.plugin("approx-prefix-cache-producer-2").parameters == {"blockSize": 64, "autoTune": False,
                                                                       "legacyV15": True}
    assert cfg.plugin("p3").parameters == {"prefixMatchInfoProducerName": "approx-prefix-cache-producer"}
    assert cfg.plugin("prefix-cache-affinity-filter").parameters == {
        "prefixMatchInfoProducerName": "approx-prefix-cache-producer-2", "inFlightLoadProducerName": "inflight-load-producer"}
    assert cfg.plugin("prefix-based-pd-decider").parameters == {
        "nonCachedTokens": 10, "prefixMatchInfoProducerName": "approx-prefix-cache-producer"}


@pytest.mark.parametrize("text, expected", [
    ("plugins: [{type: prefix-cache-affinity-filter, parameters: {affinityThreshold: 1.5}}]",
     "plugins[0].parameters.affinityThreshold: must be <= 1, got 1.5"),  # the reference checks only <= 1.0
    ("plugins: [{type: approx-prefix-cache-producer, parameters: {blockSize: -4}}]",
     "plugins[0].parameters.blockSize: must be >= 0, got -4"),
])
def test_parameter_bounds_name_the_key(text, expected):
    assert errmsg(text) == expected
