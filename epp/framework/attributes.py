"""Scalar endpoint attributes as plugins name them (the reference's
datalayer/attribute/metrics ResolveConfiguredKey and ReadScalarMetricValue): an attribute
name plus the producer that publishes it. Producer omitted (None) = the core metrics
extractor's custom scalar metrics (Metrics.custom); the attribute name then may not contain
"/" (the old combined "attribute/producer" spelling, which would silently match nothing).
Producers whose endpoint attributes are not built here are refused naming the feature."""

from __future__ import annotations

import math

from epp.framework.params import PluginError
from epp.framework.types import Endpoint

CORE_METRICS_EXTRACTOR = "core-metrics-extractor"
# producers of endpoint attributes in the reference that are not built here -> the feature
UNBUILT_PRODUCERS: dict[str, str] = {
    "dcgm-extractor": "GPU metrics (dcgm-data-source / dcgm-extractor)",
    "multicluster-metrics-extractor": "multi-cluster routing (multicluster-metrics-extractor)",
    "topology-extractor": "topology-aware routing (topology-extractor)",
    "": "producer-agnostic endpoint attributes (e.g. the multi-cluster llm-d.ai/multicluster-* ones)",
}


def resolve_attribute(attribute: str, producer: str | None, attribute_param: str = "attribute") -> str:
    """The key to read from Metrics.custom, or a PluginError naming the parameter (as a
    Params.validate error: "<param>: <why>")."""
    where = attribute_param
    if producer is None:
        if "/" in attribute:
            a, _, p = attribute.rpartition("/")
            raise PluginError(f"{where}: attribute {attribute!r} contains '/' but no producer is set; the attribute "
                              f"and its producer are separate parameters: if this is the combined "
                              f"\"Attribute/Producer\" spelling, split it into attribute: {a!r} and producer: "
                              f"{p!r}; if the name itself contains '/', set producer explicitly")
        return attribute
    if producer == CORE_METRICS_EXTRACTOR:
        return attribute
    feature = UNBUILT_PRODUCERS.get(producer)
    if feature is not None:
        raise PluginError(f"producer: {producer!r}: endpoint attributes of {feature}, not built yet")
    raise PluginError(f"producer: {producer!r} publishes no endpoint attribute here "
                      f"(known: {CORE_METRICS_EXTRACTOR})")


def read_scalar(endpoint: Endpoint, key: str) -> float | None:
    """The endpoint's value of a custom scalar metric; None when absent or not a finite number."""
    v = endpoint.metrics.custom.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)
