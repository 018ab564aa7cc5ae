"""The data layer: what the scheduler reads about endpoints, gathered in the background.

Sources poll every endpoint (metrics-data-source: the Prometheus page into
Endpoint.metrics; models-data-source: /v1/models into Endpoint.served) or relay events
(endpoint-notification-source, k8s-notification-source); extractors say what to make of
a source's payload; epp.datalayer.runtime.DataLayer binds and runs them.
"""

from epp.datalayer.collector import EndpointPoller, MetricsCollector, ScrapeStats, is_stale
from epp.datalayer.extract import find_samples, parse_labels, parse_metrics, select_samples
from epp.datalayer.models import ModelsCollector, parse_models
from epp.datalayer.runtime import DataLayer, ScrapeDefaults
from epp.datalayer.specs import DEFAULT_ENGINE, DEFAULT_SPECS, EngineMetricSpec, specs_from_config

__all__ = [
    "DEFAULT_ENGINE",
    "DEFAULT_SPECS",
    "DataLayer",
    "EndpointPoller",
    "EngineMetricSpec",
    "MetricsCollector",
    "ModelsCollector",
    "ScrapeDefaults",
    "ScrapeStats",
    "find_samples",
    "is_stale",
    "parse_labels",
    "parse_metrics",
    "parse_models",
    "select_samples",
    "specs_from_config",
]
