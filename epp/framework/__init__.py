"""The plugin contracts: what every extension point hands a plugin, and what it returns.

Modelled on the Kubernetes scheduler framework and the reference picker's
`framework` package: a scheduling cycle runs profiles; each profile runs its filters
in sequence, then its weighted scorers, then its picker. Plugins see only the request,
the candidate endpoints and the per-cycle state; they never reach into the server, the
gRPC stream or the datastore.

Data between plugins goes by typed key (datakeys.py): a producer writes the cycle
state in PrepareData, consumers read it by the same key. Built-in plugins use exactly
these contracts. A platform team's plugin is a class with
a `type_name`, a `Params` dataclass (its YAML `parameters`) and one or more of the
extension-point methods below, registered by entry point `epp.plugins` or named as
`module:Class` in the config.
"""

from __future__ import annotations

from epp.framework.datakeys import DataKey, PrefixCacheMatchInfo, ProducerParam
from epp.framework.metrics import PluginMetrics
from epp.framework.params import (
    NoParams,
    PluginError,
    bounded,
    params_from_mapping,
    plugin_params,
)
from epp.framework.plugins import (
    EXTENSION_POINTS,
    ConfiguredPlugin,
    EndpointsChanged,
    EveryProfileOnce,
    Filter,
    NamedPlugin,
    Parser,
    PDDecider,
    Picker,
    Plugin,
    PluginHandle,
    PrepareData,
    PreRequest,
    ProfileHandler,
    ResponseComplete,
    ResponseReceived,
    ResponseStreaming,
    SaturationDetector,
    SchedulerProfile,
    Scorer,
    extension_points,
)
from epp.framework.types import (
    CONTEXT_LENGTH_RANGE_LABEL,
    ENGINE_TYPE_LABEL,
    ROLE_LABEL,
    CycleState,
    Endpoint,
    InferenceRequest,
    Metrics,
    ProfileRunResult,
    ResponseInfo,
    SchedulingResult,
    ScoredEndpoint,
)

__all__ = [
    "EXTENSION_POINTS",
    "CONTEXT_LENGTH_RANGE_LABEL",
    "ENGINE_TYPE_LABEL",
    "ROLE_LABEL",
    "CycleState",
    "DataKey",
    "Endpoint",
    "EndpointsChanged",
    "Filter",
    "InferenceRequest",
    "Metrics",
    "ConfiguredPlugin",
    "EveryProfileOnce",
    "NamedPlugin",
    "NoParams",
    "PDDecider",
    "Parser",
    "Picker",
    "Plugin",
    "PluginError",
    "PluginHandle",
    "PluginMetrics",
    "PrefixCacheMatchInfo",
    "ProducerParam",
    "PreRequest",
    "PrepareData",
    "ProfileHandler",
    "ProfileRunResult",
    "ResponseComplete",
    "ResponseInfo",
    "ResponseReceived",
    "ResponseStreaming",
    "SaturationDetector",
    "SchedulerProfile",
    "SchedulingResult",
    "ScoredEndpoint",
    "Scorer",
    "bounded",
    "extension_points",
    "params_from_mapping",
    "plugin_params",
]
