"""The concurrency-detector plugin (the reference's flowcontrol/saturationdetector/
concurrency): saturation from the requests and tokens this picker has in flight on each
endpoint, as the in-flight load producer (inFlightLoadProducerName, default
inflight-load-producer) counts them; also a filter.

Saturation over the given endpoints: requests mode sum(in-flight requests) /
(endpoints x maxConcurrency); tokens mode the same with tokens and maxTokenConcurrency;
hybrid mode the mean over endpoints of max(requests/maxConcurrency, tokens/maxTokenConcurrency).
No endpoints: 1.0. The filter keeps endpoints under the limit x (1 + headroom) (requests,
tokens, or both in hybrid mode); it may return none, as the reference's.

The live counts are read from the producer instance (its `requests` and `tokens` maps,
endpoint -> count), found through the handle by name: saturation is asked outside any
scheduling cycle, where the producer's per-request snapshot is not available.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import (
    INFLIGHT_LOAD,
    INFLIGHT_LOAD_CONSUMER,
    INFLIGHT_LOAD_PRODUCER,
    InFlightLoadInfo,
)
from epp.framework.plugins import ConfiguredPlugin

MODES = ("requests", "tokens", "hybrid")


@dataclass(slots=True)
class ConcurrencyParams:
    concurrencyMode: str = "requests"
    maxConcurrency: int = 100
    maxTokenConcurrency: int = 1_000_000
    headroom: float = 0.0
    inFlightLoadProducerName: str = ""  # "": inflight-load-producer

    def validate(self) -> None:
        if self.maxConcurrency <= 0:
            raise ValueError(f"maxConcurrency: must be strictly positive, got {self.maxConcurrency}")
        if self.maxTokenConcurrency <= 0:
            raise ValueError(f"maxTokenConcurrency: must be strictly positive, got {self.maxTokenConcurrency}")
        if not self.headroom >= 0.0:
            raise ValueError(f"headroom: must be a non-negative value, got {self.headroom}")
        if self.concurrencyMode not in MODES:
            raise ValueError(f"concurrencyMode: unsupported {self.concurrencyMode!r} (requests, tokens or hybrid)")


def _ratio(inflight: int, capacity: int) -> float:
    return inflight / capacity if capacity else 1.0


class ConcurrencyDetector(ConfiguredPlugin[ConcurrencyParams]):
    type_name = "concurrency-detector"
    Params = ConcurrencyParams
    consumes = (INFLIGHT_LOAD_CONSUMER,)

    def configure(self, p: ConcurrencyParams, handle: PluginHandle) -> None:
        # the filter's limits: maxConcurrency and maxTokenConcurrency raised by the headroom
        self.request_limit = int(p.maxConcurrency * (1.0 + p.headroom))
        self.token_limit = int(p.maxTokenConcurrency * (1.0 + p.headroom))
        self.producer_name = p.inFlightLoadProducerName or INFLIGHT_LOAD_PRODUCER
        self._key = INFLIGHT_LOAD.of(self.producer_name)
        self._plugins = handle.plugins  # the live instance map: the producer may be built after this plugin

    def _counts(self) -> tuple[Mapping[Endpoint, int], Mapping[Endpoint, int]]:
        producer = self._plugins.get(self.producer_name)
        return getattr(producer, "requests", None) or {}, getattr(producer, "tokens", None) or {}

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        if not endpoints:
            return 1.0
        requests, tokens = self._counts()
        n, p = len(endpoints), self.params
        if p.concurrencyMode == "tokens":
            return _ratio(sum(tokens.get(e, 0) for e in endpoints), n * p.maxTokenConcurrency)
        if p.concurrencyMode == "hybrid":
            return sum(max(requests.get(e, 0) / p.maxConcurrency, tokens.get(e, 0) / p.maxTokenConcurrency)
                       for e in endpoints) / n
        return _ratio(sum(requests.get(e, 0) for e in endpoints), n * p.maxConcurrency)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        load = cycle.read(self._key)
        requests = load.requests if isinstance(load, InFlightLoadInfo) else {}
        tokens = load.tokens if isinstance(load, InFlightLoadInfo) else {}
        mode = self.params.concurrencyMode
        kept = []
        for e in endpoints:
            r_ok = requests.get(e, 0) < self.request_limit
            t_ok = tokens.get(e, 0) < self.token_limit
            if (mode == "requests" and r_ok) or (mode == "tokens" and t_ok) or (mode == "hybrid" and r_ok and t_ok):
                kept.append(e)
        return kept
