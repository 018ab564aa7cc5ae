"""The data layer: model-server metrics scraped in the background into Endpoint.metrics."""

from epp.datalayer.collector import MetricsCollector, ScrapeStats, is_stale
from epp.datalayer.extract import find_samples, parse_labels, parse_metrics
from epp.datalayer.specs import DEFAULT_ENGINE, DEFAULT_SPECS, EngineMetricSpec, specs_from_config

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_SPECS",
    "EngineMetricSpec",
    "MetricsCollector",
    "ScrapeStats",
    "find_samples",
    "is_stale",
    "parse_labels",
    "parse_metrics",
    "specs_from_config",
]
