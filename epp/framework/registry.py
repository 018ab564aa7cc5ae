"""Plugin type name -> plugin class.

BUILTINS is the one table of every built-in plugin, by extension point; a module is
imported the first time one of its types is used, so `epp serve` imports only the
plugins its config names. Third-party plugins come from the `epp.plugins` entry-point
group (name = type name, value = "module:Class") or are named directly in the config as
"module:Class". Nothing else in epp/ imports a plugin module.

A row's stability is Beta unless the ALPHA_TYPES column names it: Alpha types need
--allow-experimental-plugins, as in the reference (its registerInTreePlugins).
ALIASES maps the reference's deprecated type names to their replacements (the config
loader translates the parameters and warns once); FUTURE names the reference types whose
feature another issue builds, so refusing them says which.

A plugin class has:
  type_name: ClassVar[str]
  Params: a dataclass of its YAML parameters (camelCase names, as in the reference)
  __init__(self, name: str, params: Params, handle: PluginHandle)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from epp.framework.params import PluginError

ENTRY_POINT_GROUP = "epp.plugins"

ALPHA, BETA, STABLE = "Alpha", "Beta", "Stable"  # the reference's stability levels

BUILTINS: dict[str, str] = {
    # filters
    "decode-filter": "filters.labels:DecodeFilter",
    "prefill-filter": "filters.labels:PrefillFilter",
    "encode-filter": "filters.labels:EncodeFilter",
    "label-selector-filter": "filters.labels:LabelSelectorFilter",
    "prefix-cache-affinity-filter": "filters.prefix_affinity:PrefixCacheAffinityFilter",
    "header-based-testing-filter": "filters.conformance:HeaderBasedTestingFilter",
    "destination-endpoint-served-verifier": "filters.conformance:DestinationEndpointServedVerifier",
    "session-affinity-filter": "filters.session_affinity:SessionAffinityFilter",
    "multicluster-session-affinity-filter": "filters.session_affinity:MultiClusterSessionAffinityFilter",
    "utilization-filter": "filters.utilization:UtilizationFilter",
    "endpoint-attribute-filter": "filters.endpoint_attribute:EndpointAttributeFilter",
    "slo-headroom-tier-filter": "filters.slo_headroom:SLOHeadroomTierFilter",
    # scorers
    "queue-scorer": "scorers.load:QueueScorer",
    "running-requests-size-scorer": "scorers.load:RunningRequestsSizeScorer",
    "kv-cache-utilization-scorer": "scorers.load:KVCacheUtilizationScorer",
    "token-load-scorer": "scorers.load:TokenLoadScorer",
    "load-aware-scorer": "scorers.load:LoadAwareScorer",
    "lora-affinity-scorer": "scorers.load:LoraAffinityScorer",
    "active-request-scorer": "scorers.active_request:ActiveRequestScorer",
    "session-affinity-scorer": "scorers.session_affinity:SessionAffinityScorer",  # Alpha
    "prefix-cache-scorer": "scorers.prefix:PrefixCacheScorer",
    "no-hit-lru-scorer": "scorers.no_hit_lru:NoHitLRUScorer",
    "context-length-aware": "scorers.context_length:ContextLengthAware",  # a scorer that can also filter
    "header-label-affinity-scorer": "scorers.header_label_affinity:HeaderLabelAffinityScorer",
    "endpoint-attribute-scorer": "scorers.endpoint_attribute:EndpointAttributeScorer",
    "latency-scorer": "scorers.latency:LatencyScorer",
    # pickers
    "max-score-picker": "epp.scheduling.pickers:MaxScorePicker",
    "random-picker": "epp.scheduling.pickers:RandomPicker",
    "weighted-random-picker": "epp.scheduling.pickers:WeightedRandomPicker",
    # profile handlers and their prefill/decode deciders
    "single-profile-handler": "epp.scheduling.profiles.single:SingleProfileHandler",
    "disagg-profile-handler": "epp.scheduling.profiles.disaggregated:DisaggProfileHandler",
    "data-parallel-profile-handler": "epp.scheduling.profiles.data_parallel:DataParallelProfileHandler",
    "header-profile-handler": "epp.scheduling.profiles.header:HeaderProfileHandler",  # Alpha
    "prefix-based-pd-decider": "epp.scheduling.profiles.deciders:PrefixBasedPDDecider",
    "always-disagg-pd-decider": "epp.scheduling.profiles.deciders:AlwaysDisaggPDDecider",
    "always-disagg-multimodal-decider": "epp.scheduling.profiles.deciders:AlwaysDisaggMultimodalDecider",
    # data producers (requestcontrol)
    "approx-prefix-cache-producer": "epp.requestcontrol.producers.prefix:ApproxPrefixCacheProducer",
    "inflight-load-producer": "epp.requestcontrol.producers.inflight:InFlightLoadProducer",
    "token-producer": "epp.requestcontrol.producers.tokens:TokenProducer",
    "session-id-producer": "epp.requestcontrol.producers.session:SessionIdProducer",
    "predicted-latency-producer": "epp.requestcontrol.producers.latency.producer:PredictedLatencyProducer",
    "precise-prefix-cache-producer": "epp.requestcontrol.producers.precise_prefix:PrecisePrefixCacheProducer",
    # deprecated in the reference: a precise-prefix-cache-producer and a prefix-cache-scorer in one
    "precise-prefix-cache-scorer": "epp.requestcontrol.producers.precise_prefix:PrecisePrefixCacheScorer",
    # screeners (requestcontrol: once per request, before the producers)
    "disaggregatedset-rollout-screener": "epp.requestcontrol.rollout:DisaggregatedSetRolloutScreener",  # Alpha
    # saturation detectors (flowcontrol)
    "utilization-detector": "epp.flowcontrol.saturation:UtilizationDetector",
    "concurrency-detector": "epp.flowcontrol.concurrency:ConcurrencyDetector",
    # admitters (run after PrepareData, before scheduling)
    "probabilistic-admitter": "epp.flowcontrol.admitter:ProbabilisticAdmitter",
    "latency-slo-admitter": "epp.flowcontrol.latency_admitter:LatencySLOAdmitter",
    # flow-control policies (flowControl.priorityBands[].fairnessPolicyRef / orderingPolicyRef,
    # flowControl.usageLimitPolicyPluginRef)
    "global-strict-fairness-policy": "epp.flowcontrol.fairness:GlobalStrictFairnessPolicy",
    "round-robin-fairness-policy": "epp.flowcontrol.fairness:RoundRobinFairnessPolicy",
    "program-aware-fairness": "epp.flowcontrol.fairness:ProgramAwareFairness",
    "fcfs-ordering-policy": "epp.flowcontrol.ordering:FCFSOrderingPolicy",
    "edf-ordering-policy": "epp.flowcontrol.ordering:EDFOrderingPolicy",
    "slo-deadline-ordering-policy": "epp.flowcontrol.ordering:SLODeadlineOrderingPolicy",
    "static-usage-limit-policy": "epp.flowcontrol.usagelimits:StaticUsageLimitPolicy",
    "sheddable-eviction-filter": "epp.flowcontrol.eviction_policies:SheddableEvictionFilter",  # Alpha
    "priority-then-time-eviction-order-policy": "epp.flowcontrol.eviction_policies:PriorityThenTimeEvictionOrdering",
    "priority-holdback-policy": "epp.flowcontrol.usagelimits:PriorityHoldbackPolicy",  # Alpha
    "soft-reflective-ceiling-policy": "epp.flowcontrol.usagelimits:SoftReflectiveCeilingPolicy",  # Alpha
    # request parsers (requestHandler.parsers)
    "openai-parser": "epp.requestcontrol.parsers.openai:OpenAIParser",
    "anthropic-parser": "epp.requestcontrol.parsers.anthropic:AnthropicParser",
    "vllmhttp-parser": "epp.requestcontrol.parsers.vllmhttp:VllmHTTPParser",
    "sglanghttp-parser": "epp.requestcontrol.parsers.sglanghttp:SGLangHTTPParser",
    "passthrough-parser": "epp.requestcontrol.parsers.passthrough:PassthroughParser",
    # data layer: sources, extractors, discovery (dataLayer.sources / dataLayer.discovery)
    "metrics-data-source": "epp.datalayer.sources:MetricsDataSource",
    "models-data-source": "epp.datalayer.sources:ModelsDataSource",
    "endpoint-notification-source": "epp.datalayer.sources:EndpointNotificationSource",
    "k8s-notification-source": "epp.datalayer.sources:K8sNotificationSource",
    "core-metrics-extractor": "epp.datalayer.extractors:CoreMetricsExtractor",
    "models-data-extractor": "epp.datalayer.extractors:ModelsDataExtractor",
    "file-discovery": "epp.discovery.file:FileDiscovery",
}


@dataclass(frozen=True, slots=True)
class Alias:
    """A deprecated type name of the reference and what replaces it."""

    replacement: str
    deprecated_in: str
    removal_in: str


ALIASES: dict[str, Alias] = {
    "by-label-selector": Alias("label-selector-filter", "v0.9.0", "v0.11.0"),
    "by-label": Alias("label-selector-filter", "v0.9.0", "v0.11.0"),
    "pd-profile-handler": Alias("disagg-profile-handler", "v0.7.0", "v0.9.0"),
    "prefill-header-handler": Alias("disagg-profile-handler", "v0.9.0", "v0.11.0"),
    "disagg-headers-handler": Alias("disagg-profile-handler", "v0.9.0", "v0.11.0"),
    "tokenizer": Alias("token-producer", "v0.9.0", "v0.11.0"),
}

_PRECISE = "precise prefix-cache routing (issue 12)"
FUTURE: dict[str, str] = {
    **dict.fromkeys(("mm-embeddings-cache-scorer",
                     "mm-embeddings-cache-producer"), _PRECISE),
}

# The stability column of BUILTINS: the rows the reference registers as Alpha (the rest are Beta).
ALPHA_TYPES: frozenset[str] = frozenset({"session-affinity-scorer", "session-affinity-filter",
                                         "multicluster-session-affinity-filter", "utilization-filter",
                                         "header-label-affinity-scorer", "endpoint-attribute-filter",
                                         "disaggregatedset-rollout-screener",
                                         "endpoint-attribute-scorer", "header-profile-handler",
                                         "priority-holdback-policy", "soft-reflective-ceiling-policy",
                                         "sheddable-eviction-filter", "priority-then-time-eviction-order-policy"})

_loaded: dict[str, type] = {}


def stability(type_name: str) -> str:
    """Alpha, Beta or Stable; a type that is not built in (entry point, module:Class) is
    Stable, as the reference treats unregistered metadata."""
    if type_name not in BUILTINS:
        return STABLE
    return ALPHA if type_name in ALPHA_TYPES else BETA


def _import(type_name: str, target: str, where: str) -> type:
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise PluginError(f"{where}: cannot load plugin {type_name!r}: {e}") from None
    _loaded[type_name] = cls
    return cls


def plugin_class(type_name: str, where: str = "type") -> type:
    """Resolve a type name: built-in, entry point, or "module:Class"."""
    cls = _loaded.get(type_name)
    if cls is not None:
        return cls
    target = BUILTINS.get(type_name)
    if target is not None:
        return _import(type_name, target, where)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == type_name:
            try:
                cls = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken third-party package must not crash start-up
                raise PluginError(f"{where}: cannot load plugin {type_name!r} from entry point {ep.value!r}: {e}") from None
            _loaded[type_name] = cls
            return cls
    if ":" in type_name:
        return _import(type_name, type_name, where)
    if type_name in FUTURE:
        raise PluginError(f"{where}: plugin type {type_name!r} needs {FUTURE[type_name]}, not built yet")
    if type_name in ALIASES:
        raise PluginError(f"{where}: plugin type {type_name!r} is a deprecated alias of "
                          f"{ALIASES[type_name].replacement!r}, which is not built yet")
    raise PluginError(f"{where}: unknown plugin type {type_name!r} (known: {', '.join(known_types())})")


def known_types() -> list[str]:
    return sorted(BUILTINS)
