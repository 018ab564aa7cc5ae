"""Scorers on the model servers' load: queue, running requests, KV usage, in-flight tokens
(read from an in-flight load producer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

from epp.framework import CycleState, Endpoint, InferenceRequest, NamedPlugin, PluginHandle
from epp.framework.datakeys import INFLIGHT_LOAD, INFLIGHT_LOAD_CONSUMER, INFLIGHT_LOAD_PRODUCER
from epp.framework.plugins import ConfiguredPlugin

_waiting = attrgetter("metrics.waiting_queue_size")
_running = attrgetter("metrics.running_requests_size")
_kv = attrgetter("metrics.kv_cache_usage_percent")

DEFAULT_QUEUE_THRESHOLD_TOKENS = 4194304  # token-load-scorer's queueThresholdTokens
DEFAULT_LOAD_THRESHOLD = 128  # load-aware-scorer's threshold


def min_max_inverse(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min): the least loaded scores 1.0, the most 0.0; all equal: 1.0."""
    if not values:
        return []
    hi, lo = max(values), min(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


class QueueScorer(NamedPlugin):
    type_name = "queue-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return min_max_inverse(list(map(_waiting, endpoints)))


class RunningRequestsSizeScorer(NamedPlugin):
    type_name = "running-requests-size-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return min_max_inverse(list(map(_running, endpoints)))


class KVCacheUtilizationScorer(NamedPlugin):
    type_name = "kv-cache-utilization-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        return [1.0 - u for u in map(_kv, endpoints)]


@dataclass(slots=True)
class TokenLoadParams:
    queueThresholdTokens: int = DEFAULT_QUEUE_THRESHOLD_TOKENS  # <= 0: the default, as the reference
    inFlightLoadProducerName: str = INFLIGHT_LOAD_PRODUCER


class TokenLoadScorer(ConfiguredPlugin[TokenLoadParams]):
    """1 - min(tokens, T)/T (1.0 when none), where tokens = the tokens in flight to the
    endpoint plus this request's uncached tokens there, both from the in-flight load
    producer (scheduling/scorer/tokenload/token_load.go)."""

    type_name = "token-load-scorer"
    Params = TokenLoadParams
    consumes = (INFLIGHT_LOAD_CONSUMER,)

    def configure(self, p: TokenLoadParams, handle: PluginHandle) -> None:
        self.threshold = p.queueThresholdTokens if p.queueThresholdTokens > 0 else DEFAULT_QUEUE_THRESHOLD_TOKENS
        self._key = self.producer_key(INFLIGHT_LOAD, INFLIGHT_LOAD_CONSUMER)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        load = cycle.read(self._key)
        if load is None:
            return [1.0] * len(endpoints)
        t, tokens, uncached = self.threshold, load.tokens.get, load.uncached.get
        return [1.0 - min(tokens(e, 0) + uncached(e, 0), t) / t for e in endpoints]


@dataclass(slots=True)
class LoadAwareParams:
    threshold: int = DEFAULT_LOAD_THRESHOLD  # <= 0: the default, as the reference


class LoadAwareScorer(ConfiguredPlugin[LoadAwareParams]):
    """Empty queue: 0.5; else 0.5 * (1 - min(w, T)/T), so any queue scores below an idle server."""

    type_name = "load-aware-scorer"
    Params = LoadAwareParams

    def configure(self, p: LoadAwareParams, handle: PluginHandle) -> None:
        self.threshold = p.threshold if p.threshold > 0 else DEFAULT_LOAD_THRESHOLD

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        t = self.threshold
        out = []
        for e in endpoints:
            w = e.metrics.waiting_queue_size
            out.append(0.5 if w <= 0 else 0.5 * (1.0 - min(w, t) / t))
        return out


class LoraAffinityScorer(NamedPlugin):
    """1.0 adapter running; 0.9 adapter registered on the server (its /v1/models lists it,
    from models-data-source) but not in a batch slot yet; 0.8 room to load one more; 0.6
    adapter waiting; else 0."""

    type_name = "lora-affinity-scorer"

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        model = request.target_model
        out = []
        for e in endpoints:
            m = e.metrics
            if model in m.running_lora_adapters:
                out.append(1.0)
            elif model in e.served.adapters:
                out.append(0.9)
            elif len(m.running_lora_adapters) + len(m.waiting_lora_adapters) < m.max_active_models:
                out.append(0.8)
            elif model in m.waiting_lora_adapters:
                out.append(0.6)
            else:
                out.append(0.0)
        return out
