"""Configs that must stop start-up, each with the message it gives, which names the key: the
loader's checks (keys, types, references between plugins) and each plugin's own parameter
checks. One table, one check: building the plugin set of the text raises."""

import pytest

from tests.helpers import plugin_set_error


def lone(ptype: str, params: str) -> str:
    """A config of one `ptype` plugin with these parameters (YAML flow text), beside a queue-scorer
    in one profile."""
    return (f"plugins: [{{type: {ptype}, parameters: {params}}}, {{type: queue-scorer}}]\n"
            "schedulingProfiles: [{name: d, plugins: [{pluginRef: queue-scorer}]}]\n")


# each plugin's own parameter checks: plugin type -> (its parameters, the message)
PARAMETER_ERRORS = {
    "probabilistic-admitter": (
        ("{queueDepthThreshold: 0}", "queueDepthThreshold: must be > 0"),
        ("{kvCacheUtilThreshold: 0}", "kvCacheUtilThreshold: must be > 0"),
        ("{power: -1}", "power: must be > 0"),
        ("{k: 0}", "k: must be > 0"),
    ),
    "concurrency-detector": (
        ("{maxConcurrency: 0}", "maxConcurrency: must be strictly positive"),
        ("{maxTokenConcurrency: -1}", "maxTokenConcurrency: must be strictly positive"),
        ("{headroom: -0.1}", "headroom: must be a non-negative value"),
        ("{concurrencyMode: bytes}", "concurrencyMode: unsupported 'bytes'"),
    ),
    "priority-holdback-policy": (
        ("{}", "minCeiling: required"),
        ("{minCeiling: 1.0}", "minCeiling: must be in [0.0, 1.0)"),
        ("{minCeiling: 0.5, maxCeiling: 0.5}", "must be strictly less than maxCeiling"),
        ("{minCeiling: 0.1, domain: rankish}", "domain: unsupported 'rankish'"),
        ("{minCeiling: 0.1, shape: step}", "shape: unsupported 'step'"),
    ),
    "program-aware-fairness": (
        ("{strategy: wfq}", 'strategy: unknown scoring strategy \'wfq\': only "las" is supported'),
        ("{evictionSweepSeconds: 0}", "evictionSweepSeconds: must be > 0"),
        ("{lasWeightService: -1}", "lasWeightService: must be >= 0"),
        ("{lasHalfLifeSeconds: -1}", "lasHalfLifeSeconds: must be >= 0"),
        ("{evictionTtlSeconds: -1}", "evictionTtlSeconds: must be >= 0"),
    ),
    "data-parallel-profile-handler": (
        ("{primaryPort: 70000}", "plugins[0].parameters.primaryPort: must be in [0, 65535], got 70000"),
        ("{primaryPort: -1}", "plugins[0].parameters.primaryPort: must be in [0, 65535], got -1"),
        ("{primaryPort: x}", "plugins[0].parameters.primaryPort: expected an integer"),
    ),
}


@pytest.mark.parametrize("text, expected", [
    # --------------------------------------------------------------- keys, types, plugins, profiles
    ("plugins: [{type: queue-scorer}, {type: queue-scorer}, {type: prefix-cache-scorer, "
     "parameters: {blockSizeTokens: x}}]",
     "plugins[1].name: duplicate plugin name 'queue-scorer'"),
    ("plugins: [{type: queue-scorer}, {type: kv-cache-utilization-scorer}, {type: prefix-cache-scorer, "
     "parameters: {blockSizeTokens: x}}]",
     "plugins[2].parameters.blockSizeTokens: expected an integer, got 'x'"),
    ("plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokenz: 3}}]",
     "plugins[0].parameters.blockSizeTokenz: unknown parameter"),
    ("plugins: [{type: no-such-scorer}]", "plugins[0].type: unknown plugin type 'no-such-scorer'"),
    ("plugins: [{type: queue-scorer, parameters: {a: 1}}]", "plugins[0].parameters: plugin 'queue-scorer' takes no"),
    ("plugins: [{name: x}]", "plugins[0].type: required"),
    ("plugins: [{type: queue-scorer, nmae: x}]", "plugins[0].nmae: unknown key"),
    ("plugin: []", "plugin: unknown key"),
    ("kind: Foo", "kind: expected EndpointPickerConfig"),
    ("apiVersion: v1", "apiVersion: expected one of"),
    ("plugins: {type: queue-scorer}", "plugins: expected a list"),
    ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: nope}]}]",
     "schedulingProfiles[0].plugins[0].pluginRef: no plugin named 'nope'"),
    ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: queue-scorer, "
     "weight: heavy}]}]", "schedulingProfiles[0].plugins[0].weight: expected a number, got 'heavy'"),
    ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: []}, {name: a, plugins: []}]",
     "schedulingProfiles[1].name: duplicate profile name 'a'"),
    ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: []}, {name: b, plugins: []}]",
     "several schedulingProfiles need a profile handler"),
    ("plugins: [{type: queue-scorer}]\nsaturationDetector: {pluginRef: queue-scorer}",
     "saturationDetector.pluginRef: 'queue-scorer' is not a saturation detector"),
    ("plugins: [{type: queue-scorer}]\nsaturationDetector: {pluginRef: gone}",
     "saturationDetector.pluginRef: no plugin named 'gone'"),
    ("flowControl: {maxBytes: lots}", "flowControl.maxBytes: expected a quantity like 10Gi, got 'lots'"),
    ("flowControl: {defaultRequestTTL: soon}", "flowControl.defaultRequestTTL: expected a duration like 60s"),
    ("flowControl: {priorityBands: [{maxBytes: 1}]}", "flowControl.priorityBands[0].priority: required"),
    ("flowControl: {priorityBands: [{priority: 1, maxRequests: many}]}",
     "flowControl.priorityBands[0].maxRequests: expected an integer, got 'many'"),
    ("flowControl: {priorityBands: [{priority: 1, speed: 3}]}", "flowControl.priorityBands[0].speed: unknown key"),
    ("plugins: [{type: utilization-detector, parameters: {metricsStalenessThreshold: later}}]",
     "plugins[0].parameters.metricsStalenessThreshold: expected a duration"),
    ("plugins: [{type: max-score-picker, parameters: {maxNumOfEndpoints: 0}}]",
     "plugins[0].parameters.maxNumOfEndpoints: must be >= 1"),
    ("plugins: [{type: label-selector-filter, parameters: {matchExpressions: [{key: a, operator: Near}]}}]",
     "plugins[0].parameters.matchExpressions[0].operator: expected one of"),
    ("featureGates: flowControl", "featureGates: expected a list"),
    ("engineMetrics: [a]", "engineMetrics: expected a mapping"),
    ("plugins: [\n", "config: not valid YAML"),
    # --------------------------------------------------------------- prefix producer wiring
    ("plugins: [{type: approx-prefix-cache-producer}, {type: prefix-cache-scorer, parameters: {blockSizeTokens: 8}}]",
     "plugins[1].parameters.blockSizeTokens: set it on the producer 'approx-prefix-cache-producer'"),
    ("plugins: [{type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: nope}}]",
     "plugins[0].parameters.prefixMatchInfoProducerName: no plugin named 'nope'"),
    ("plugins: [{type: no-hit-lru-scorer, parameters: {prefixMatchInfoProducerName: nope}}]",
     "plugins[0].parameters.prefixMatchInfoProducerName: no plugin named 'nope'"),
    ("plugins: [{type: queue-scorer}, {type: no-hit-lru-scorer, parameters: {prefixPluginName: queue-scorer}}]",
     "plugins[1].parameters.prefixPluginName: 'queue-scorer' is not a data producer"),
    ("plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: 0}}]",
     "plugins[0].parameters.blockSizeTokens: must be > 0, got 0"),
    ("plugins: [{type: prefix-cache-scorer}, {type: no-hit-lru-scorer, parameters: "
     "{prefixPluginName: prefix-cache-scorer, prefixMatchInfoProducerName: approx-prefix-cache-producer}}]",
     "plugins[1].parameters.prefixPluginName: not allowed together with prefixMatchInfoProducerName"),
    # --------------------------------------------------------------- featureGates
    ("featureGates: [dataLayer]", "featureGates[0]: unknown feature gate 'dataLayer' (registered: flowControl"),
    ("featureGates: ['flowControl=maybe']", "featureGates[0]: 'maybe' is not a valid value for the feature gate"),
    ("featureGates: ['haPopulateNonLeaderDatastore=false']", "featureGates[0]: haPopulateNonLeaderDatastore=false"),
    ("featureGates: {flowControl: true}", "featureGates: expected a list"),
    # --------------------------------------------------------------- flowControl
    ("featureGates: [flowControl]\nflowControl: {usageLimitPolicyPluginRef: fcfs-ordering-policy}",
     "flowControl.usageLimitPolicyPluginRef: no usage-limit policy plugin named 'fcfs-ordering-policy'"),
    ("featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, fairnessPolicyRef: nope}]}",
     "flowControl.priorityBands[0].fairnessPolicyRef: no fairness policy plugin named 'nope' in plugins"),
    ("featureGates: [flowControl]\nplugins: [{type: queue-scorer}]\n"
     "flowControl: {defaultPriorityBand: {orderingPolicyRef: queue-scorer}}",
     "flowControl.defaultPriorityBand.orderingPolicyRef: plugin 'queue-scorer' (queue-scorer) is not an ordering"),
    ("featureGates: [flowControl]\nflowControl: {priorityBands: [{priority: 1, "
     "orderingPolicyRef: round-robin-fairness-policy}]}",
     "flowControl.priorityBands[0].orderingPolicyRef: no ordering policy plugin named 'round-robin-fairness-policy'"),
    ("plugins: [{type: static-usage-limit-policy, parameters: {threshold: .nan}}]", "threshold: must be a finite"),
    ("flowControl: {defaultPriorityBand: {weight: 2}}", "flowControl.defaultPriorityBand.weight: unknown key"),
    ("flowControl: {maxRequest: 2}", "flowControl.maxRequest: unknown key"),
    ("flowControl: {enableEviction: yes please}", "flowControl.enableEviction: expected true or false"),
    ("flowControl: {priorityBands: [{priority: 1, fairnessPolicy: round-robin, "
     "fairnessPolicyRef: global-strict-fairness-policy}]}",
     "flowControl.priorityBands[0].fairnessPolicy: not allowed together with fairnessPolicyRef"),
    # --------------------------------------------------------------- requestHandler / parser
    ("requestHandler: {parsers: [{pluginRef: nope}]}", "requestHandler.parsers[0].pluginRef: no plugin named 'nope'"),
    ("requestHandler: {parsers: [{pluginRef: queue-scorer}]}",
     "requestHandler.parsers[0].pluginRef: 'queue-scorer' is not a parser plugin"),
    ("requestHandler: {parser: []}", "requestHandler.parser: unknown key"),
    ("requestHandler: {parsers: [{ref: x}]}", "requestHandler.parsers[0].ref: unknown key"),
    ("parser: {pluginRef: nope}", "parser.pluginRef: no plugin named 'nope'"),
    # --------------------------------------------------------------- dataLayer
    ("dataLayer: {sources: [{pluginRef: gone}]}", "dataLayer.sources[0].pluginRef: no plugin named 'gone'"),
    ("plugins: [{type: queue-scorer}]\ndataLayer: {sources: [{pluginRef: queue-scorer}]}",
     "dataLayer.sources[0].pluginRef: 'queue-scorer' is not a data source"),
    ("plugins: [{type: metrics-data-source}, {type: queue-scorer}]\n"
     "dataLayer: {sources: [{pluginRef: metrics-data-source, extractors: [{pluginRef: queue-scorer}]}]}",
     "dataLayer.sources[0].extractors[0].pluginRef: 'queue-scorer' is not a data extractor"),
    ("plugins: [{type: queue-scorer}]\ndataLayer: {discovery: {pluginRef: queue-scorer}}",
     "dataLayer.discovery.pluginRef: 'queue-scorer' is not a endpoint discovery plugin"),
    ("dataLayer: {peerDiscovery: {pluginRef: x}}", "dataLayer.peerDiscovery: sharing data-layer state"),
    ("dataLayer: {crossReplicaSyncerPluginRef: x}", "dataLayer.crossReplicaSyncerPluginRef: sharing"),
    ("dataLayer: {injectDefaults: no thanks}", "dataLayer.injectDefaults: expected true or false"),
    ("dataLayer: {source: []}", "dataLayer.source: unknown key"),
    ("dataLayer: {sources: [{pluginRef: a, extractor: []}]}", "dataLayer.sources[0].extractor: unknown key"),
    # --------------------------------------------------------------- unknown keys, deeper down
    ("requestHandlers: {}", "requestHandlers: unknown key"),
    ("dataLayer: {discovery: {pluginRef: a, path: b}}", "dataLayer.discovery.path: unknown key"),
    ("parser: {pluginRef: a, extra: 1}", "parser.extra: unknown key"),
    ("flowControl: {saturationDetector: {pluginRef: a, x: 1}}", "flowControl.saturationDetector.x: unknown key"),
] + [(lone(ptype, params), expected) for ptype, rows in PARAMETER_ERRORS.items() for params, expected in rows])
def test_config_errors_name_the_key(text, expected):
    assert expected in plugin_set_error(text, ValueError)
