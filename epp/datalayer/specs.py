"""Which Prometheus series each model-server engine exposes for the scheduler's inputs.

Names follow the reference picker (scheduling.md, "Model-server metrics"). An
EndpointPickerConfig may remap them per engine under its `engineMetrics` key:

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
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


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
}

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
            if not isinstance(name, str) or (name and not _METRIC_NAME.match(name)):
                raise ValueError(f"{where}.{key}: expected a Prometheus metric name, got {name!r}")
            field = _CONFIG_KEYS[key]
            if not name and field in ("waiting_queue", "running_requests", "kv_cache_usage"):
                raise ValueError(f"{where}.{key}: must not be empty")
            changes[field] = (name,) if field == "kv_cache_usage" else name
        specs[engine] = dataclasses.replace(specs[engine], **changes)
    return specs
