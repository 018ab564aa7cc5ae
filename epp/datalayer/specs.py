"""Which Prometheus series each model-server engine exposes for the scheduler's inputs.

Names follow the reference picker's core-metrics-extractor (its built-in engineConfigs:
vllm, sglang, trtllm-serve, triton-tensorrt-llm, triton). A series may be narrowed by
labels, as the reference's metric specs are: `nv_trt_llm_request_metrics{request_type=waiting}`
(values quoted or not). The reference's `engineConfigs` map onto these specs
(`spec_from_engine_config`); the project's older `engineMetrics` key remaps them too:

    engineMetrics:
      vllm: {waitingQueue: "...", runningRequests: "...", kvCacheUsage: "...",
             loraInfo: "...", cacheInfo: "..."}
      trtllm-serve: {blockSize: "...", numBlocks: "..."}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_ENGINE = "vllm"
ENGINE_LABEL_KEY = "llm-d.ai/engine-type"  # the endpoint label naming its engine (reference default)
LEGACY_ENGINE_LABEL_KEY = "inference.networking.k8s.io/engine-type"  # read when ENGINE_LABEL_KEY is absent
RESERVED_ENGINE = "default"  # the reference's name for the fallback mapping; not an engine config name
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_SPEC = re.compile(r"^\s*([^\s{]+)\s*(?:\{([^}]*)\})?\s*$")
_PAIR = re.compile(r'^\s*([^\s=]+)\s*=\s*(?:"([^"]*)"|([^",}\s]*))\s*$')


def parse_series(spec: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """`name` or `name{label=value,...}` -> (name, ((label, value), ...)); ValueError
    when it is not a metric name with optional label matchers."""
    m = _SPEC.match(spec)
    if m is None or not _METRIC_NAME.match(m.group(1)):
        raise ValueError(f"not a metric specification (name or name{{label=value}}): {spec!r}")
    pairs: list[tuple[str, str]] = []
    block = (m.group(2) or "").strip()
    for part in block.split(",") if block else ():
        pm = _PAIR.match(part)
        if pm is None or not _LABEL_NAME.match(pm.group(1)):
            raise ValueError(f"bad label matcher {part.strip()!r} in {spec!r}")
        pairs.append((pm.group(1), pm.group(2) if pm.group(2) is not None else pm.group(3)))
    return m.group(1), tuple(pairs)


@dataclass(frozen=True, slots=True)
class EngineMetricSpec:
    """Series names for one engine. An empty name means the engine does not export it."""

    engine: str
    waiting_queue: str
    running_requests: str
    kv_cache_usage: tuple[str, ...]  # first series present on the page wins (fallback aliases)
    lora_info: str = ""  # info gauge with running/waiting adapters and max_lora labels
    cache_info: str = ""  # info gauge carrying block size and block count as labels
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    block_size_gauge: str = ""  # engines that export them as plain gauges instead
    num_blocks_gauge: str = ""

    def series_names(self) -> tuple[str, ...]:
        names = (self.waiting_queue, self.running_requests, *self.kv_cache_usage, self.lora_info,
                 self.cache_info, self.block_size_gauge, self.num_blocks_gauge)
        return tuple(n for n in names if n)


DEFAULT_SPECS: dict[str, EngineMetricSpec] = {
    "vllm": EngineMetricSpec(
        engine="vllm",
        waiting_queue="vllm:num_requests_waiting",
        running_requests="vllm:num_requests_running",
        kv_cache_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        lora_info="vllm:lora_requests_info",
        cache_info="vllm:cache_config_info",
    ),
    "sglang": EngineMetricSpec(
        engine="sglang",
        waiting_queue="sglang:num_queue_reqs",
        running_requests="sglang:num_running_reqs",
        kv_cache_usage=("sglang:token_usage",),
        cache_info="sglang:cache_config_info",
        block_size_label="page_size",
        num_blocks_label="num_pages",
    ),
    "trtllm-serve": EngineMetricSpec(
        engine="trtllm-serve",
        waiting_queue="trtllm_num_requests_waiting",
        running_requests="trtllm_num_requests_running",
        kv_cache_usage=("trtllm_kv_cache_utilization",),
        block_size_gauge="trtllm_kv_cache_tokens_per_block",
        num_blocks_gauge="trtllm_kv_cache_max_blocks",
    ),
    "triton-tensorrt-llm": EngineMetricSpec(  # Triton with the TensorRT-LLM backend
        engine="triton-tensorrt-llm",
        waiting_queue="nv_trt_llm_request_metrics{request_type=waiting}",
        running_requests="nv_trt_llm_request_metrics{request_type=scheduled}",
        kv_cache_usage=("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}",),
        block_size_gauge="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}",
        num_blocks_gauge="nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}",
    ),
    "triton": EngineMetricSpec(  # Triton Inference Server for non-LLM models: no KV cache
        engine="triton",
        waiting_queue="nv_inference_pending_request_count",
        running_requests="nv_inference_exec_count",
        kv_cache_usage=(),
    ),
}

# The reference's engineConfigs entry keys -> spec field (name is the engine).
ENGINE_CONFIG_KEYS = {
    "queuedRequestsSpec": "waiting_queue",
    "runningRequestsSpec": "running_requests",
    "kvUsageSpec": "kv_cache_usage",
    "loraSpec": "lora_info",
    "cacheInfoSpec": "cache_info",
    "cacheBlockSizeLabelName": "block_size_label",
    "cacheNumBlocksLabelName": "num_blocks_label",
    "cacheBlockSizeSpec": "block_size_gauge",
    "cacheNumBlocksSpec": "num_blocks_gauge",
}
_LABEL_FIELDS = ("block_size_label", "num_blocks_label")


def spec_from_engine_config(raw: Any, where: str) -> EngineMetricSpec:
    """One entry of core-metrics-extractor's `engineConfigs` -> a spec. As in the
    reference, an entry replaces the built-in engine of its name whole, and a spec left
    empty is not read. `customMetrics` (scalar endpoint attributes for
    endpoint-attribute-scorer/-filter, issue 11) is refused naming that."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: engine config name cannot be empty")
    if name == RESERVED_ENGINE:
        raise ValueError(f"{where}.name: engine config name cannot be {RESERVED_ENGINE!r} (reserved)")
    values: dict[str, Any] = {"engine": name, "waiting_queue": "", "running_requests": "", "kv_cache_usage": ()}
    for key, value in raw.items():
        if key == "name":
            continue
        if key == "customMetrics":
            if value:
                raise ValueError(f"{where}.customMetrics: custom scalar metrics feed endpoint-attribute-scorer and "
                                 "endpoint-attribute-filter, which need the remaining scheduling plugins (issue 11), "
                                 "not built yet")
            continue
        field = ENGINE_CONFIG_KEYS.get(key)
        if field is None:
            raise ValueError(f"{where}.{key}: unknown key (known: name, {', '.join(ENGINE_CONFIG_KEYS)}, customMetrics)")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"{where}.{key}: expected a string, got {value!r}")
        if field in _LABEL_FIELDS:
            if value and not _LABEL_NAME.match(value):
                raise ValueError(f"{where}.{key}: not a label name: {value!r}")
            if value:
                values[field] = value
            continue
        if value:
            try:
                parse_series(value)
            except ValueError as e:
                raise ValueError(f"{where}.{key}: {e}") from None
        values[field] = (value,) if field == "kv_cache_usage" and value else (() if field == "kv_cache_usage"
                                                                                else value)
    return EngineMetricSpec(**values)


def specs_from_engine_configs(raw: Any, where: str = "engineConfigs") -> dict[str, EngineMetricSpec]:
    """The built-in specs with core-metrics-extractor's `engineConfigs` entries put in
    place (or added); duplicate names are an error."""
    if raw is None:
        return dict(DEFAULT_SPECS)
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list, got {raw!r}")
    configured: dict[str, EngineMetricSpec] = {}
    for i, entry in enumerate(raw):
        spec = spec_from_engine_config(entry, f"{where}[{i}]")
        if spec.engine in configured:
            raise ValueError(f"{where}[{i}].name: mapping for engine type {spec.engine!r} already exists")
        configured[spec.engine] = spec
    return {**DEFAULT_SPECS, **configured}

# Config key -> spec field. `kvCacheUsage` replaces the whole fallback chain.
_CONFIG_KEYS = {
    "waitingQueue": "waiting_queue",
    "runningRequests": "running_requests",
    "kvCacheUsage": "kv_cache_usage",
    "loraInfo": "lora_info",
    "cacheInfo": "cache_info",
    "blockSize": "block_size_gauge",
    "numBlocks": "num_blocks_gauge",
}


def specs_from_config(raw: Mapping[str, Any] | None) -> dict[str, EngineMetricSpec]:
    """The default specs with the config's per-engine overrides applied. Unknown
    engines or metric keys and malformed names raise ValueError naming the key."""
    specs = dict(DEFAULT_SPECS)
    if raw is None:
        return specs
    if not isinstance(raw, Mapping):
        raise ValueError(f"engineMetrics: expected a mapping, got {raw!r}")
    for engine, overrides in raw.items():
        where = f"engineMetrics.{engine}"
        if engine not in specs:
            raise ValueError(f"{where}: unknown engine (known: {', '.join(sorted(specs))})")
        if overrides is None:
            continue
        if not isinstance(overrides, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {overrides!r}")
        changes: dict[str, Any] = {}
        for key, name in overrides.items():
            if key not in _CONFIG_KEYS:
                raise ValueError(f"{where}.{key}: unknown metric (known: {', '.join(_CONFIG_KEYS)})")
            if not isinstance(name, str):
                raise ValueError(f"{where}.{key}: expected a Prometheus metric name, got {name!r}")
            if name:
                try:
                    parse_series(name)
                except ValueError:
                    raise ValueError(f"{where}.{key}: expected a Prometheus metric name, got {name!r}") from None
            field = _CONFIG_KEYS[key]
            if not name and field in ("waiting_queue", "running_requests", "kv_cache_usage"):
                raise ValueError(f"{where}.{key}: must not be empty")
            changes[field] = (name,) if field == "kv_cache_usage" else name
        specs[engine] = dataclasses.replace(specs[engine], **changes)
    return specs
