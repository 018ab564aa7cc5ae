"""Plugin type name -> plugin class.

BUILTINS is the one table of every built-in plugin, by extension point; a module is
imported the first time one of its types is used, so `epp serve` imports only the
plugins its config names. Third-party plugins come from the `epp.plugins` entry-point
group (name = type name, value = "module:Class") or are named directly in the config as
"module:Class". Nothing else in epp/ imports a plugin module.

A plugin class has:
  type_name: ClassVar[str]
  Params: a dataclass of its YAML parameters (camelCase names, as in the reference)
  __init__(self, name: str, params: Params, handle: PluginHandle)
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from epp.framework.params import PluginError

ENTRY_POINT_GROUP = "epp.plugins"

BUILTINS: dict[str, str] = {
    # filters
    "decode-filter": "filters.labels:DecodeFilter",
    "prefill-filter": "filters.labels:PrefillFilter",
    "label-selector-filter": "filters.labels:LabelSelectorFilter",
    "prefix-cache-affinity-filter": "filters.prefix_affinity:PrefixCacheAffinityFilter",
    "header-based-testing-filter": "filters.conformance:HeaderBasedTestingFilter",
    "destination-endpoint-served-verifier": "filters.conformance:DestinationEndpointServedVerifier",
    # scorers
    "queue-scorer": "scorers.load:QueueScorer",
    "running-requests-size-scorer": "scorers.load:RunningRequestsSizeScorer",
    "kv-cache-utilization-scorer": "scorers.load:KVCacheUtilizationScorer",
    "token-load-scorer": "scorers.load:TokenLoadScorer",
    "load-aware-scorer": "scorers.load:LoadAwareScorer",
    "lora-affinity-scorer": "scorers.load:LoraAffinityScorer",
    "active-request-scorer": "scorers.active_request:ActiveRequestScorer",
    "session-affinity-scorer": "scorers.session_affinity:SessionAffinityScorer",
    "prefix-cache-scorer": "scorers.prefix:PrefixCacheScorer",
    "no-hit-lru-scorer": "scorers.no_hit_lru:NoHitLRUScorer",
    "context-length-aware": "scorers.context_length:ContextLengthAware",  # a scorer that can also filter
    # pickers
    "max-score-picker": "epp.scheduling.pickers:MaxScorePicker",
    "random-picker": "epp.scheduling.pickers:RandomPicker",
    "weighted-random-picker": "epp.scheduling.pickers:WeightedRandomPicker",
    # profile handlers and their prefill/decode deciders
    "single-profile-handler": "epp.scheduling.profiles.single:SingleProfileHandler",
    "disagg-profile-handler": "epp.scheduling.profiles.disaggregated:DisaggProfileHandler",
    "prefix-based-pd-decider": "epp.scheduling.profiles.disaggregated:PrefixBasedPDDecider",
    "always-disagg-pd-decider": "epp.scheduling.profiles.disaggregated:AlwaysDisaggPDDecider",
    # data producers (requestcontrol)
    "approx-prefix-cache-producer": "epp.requestcontrol.producers.prefix:ApproxPrefixCacheProducer",
    # saturation detectors (flowcontrol)
    "utilization-detector": "epp.flowcontrol.saturation:UtilizationDetector",
    # request parsers (requestHandler.parsers)
    "openai-parser": "epp.requestcontrol.parsers.openai:OpenAIParser",
    "anthropic-parser": "epp.requestcontrol.parsers.anthropic:AnthropicParser",
    "vllmhttp-parser": "epp.requestcontrol.parsers.vllmhttp:VllmHTTPParser",
    "sglanghttp-parser": "epp.requestcontrol.parsers.sglanghttp:SGLangHTTPParser",
    "passthrough-parser": "epp.requestcontrol.parsers.passthrough:PassthroughParser",
}

_loaded: dict[str, type] = {}


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
    raise PluginError(f"{where}: unknown plugin type {type_name!r} (known: {', '.join(known_types())})")


def known_types() -> list[str]:
    return sorted(BUILTINS)
