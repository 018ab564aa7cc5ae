"""Data-layer extractor plugins (`dataLayer.sources[].extractors`): what to make of what a
source fetched. core-metrics-extractor turns a Prometheus page into Endpoint.metrics by
the engine spec the endpoint's engine-type label selects; models-data-extractor turns a
/v1/models answer into Endpoint.served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from epp.datalayer.kinds import OPENAI_MODELS, PROMETHEUS_TEXT
from epp.datalayer.specs import (
    DEFAULT_ENGINE,
    ENGINE_LABEL_KEY,
    LEGACY_ENGINE_LABEL_KEY,
    RESERVED_ENGINE,
    EngineMetricSpec,
    specs_from_engine_configs,
)
from epp.framework import PluginHandle


@dataclass(slots=True)
class CoreMetricsParams:
    engineLabelKey: str = ENGINE_LABEL_KEY  # noqa: N815 - the reference's parameter names
    defaultEngine: str = DEFAULT_ENGINE  # noqa: N815
    # [{name, queuedRequestsSpec, runningRequestsSpec, kvUsageSpec, loraSpec, cacheInfoSpec,
    #   cacheBlockSizeLabelName, cacheNumBlocksLabelName, cacheBlockSizeSpec, cacheNumBlocksSpec}]
    engineConfigs: list[Any] = field(default_factory=list)  # noqa: N815

    def validate(self) -> None:
        specs = specs_from_engine_configs(self.engineConfigs)
        if not self.engineLabelKey:
            self.engineLabelKey = ENGINE_LABEL_KEY
        if not self.defaultEngine:
            self.defaultEngine = DEFAULT_ENGINE
        if self.defaultEngine == RESERVED_ENGINE or self.defaultEngine not in specs:
            raise ValueError(f"defaultEngine: {self.defaultEngine!r} not found in engineConfigs "
                             f"(known: {', '.join(sorted(specs))})")


class CoreMetricsExtractor:
    """Reads queue, running requests, KV-cache usage, LoRA and cache-config series.
    The engine is the endpoint's `engineLabelKey` label, else its legacy
    `inference.networking.k8s.io/engine-type` label, else `defaultEngine`; built-in
    engines vllm, sglang, trtllm-serve, triton-tensorrt-llm and triton, each replaced
    whole by an `engineConfigs` entry of the same name."""

    type_name = "core-metrics-extractor"
    input_kind = PROMETHEUS_TEXT
    Params = CoreMetricsParams

    def __init__(self, name: str, params: CoreMetricsParams | None, handle: PluginHandle | None = None) -> None:
        self.name = name
        p = params if params is not None else CoreMetricsParams()
        self.specs: dict[str, EngineMetricSpec] = specs_from_engine_configs(p.engineConfigs)
        self.engine_label = p.engineLabelKey or ENGINE_LABEL_KEY
        self.legacy_engine_label = LEGACY_ENGINE_LABEL_KEY
        self.default_engine = p.defaultEngine or DEFAULT_ENGINE
        self.configured = bool(p.engineConfigs)  # engine specs set in the config (else flags may set them)


class ModelsDataExtractor:
    """Publishes an endpoint's /v1/models answer as Endpoint.served: base models, and
    LoRA adapters (entries with a `parent`), which LoRA affinity and the pool's known
    model names read."""

    type_name = "models-data-extractor"
    input_kind = OPENAI_MODELS

    def __init__(self, name: str, params: None = None, handle: PluginHandle | None = None) -> None:
        self.name = name
