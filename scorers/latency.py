"""latency-scorer (the reference's scheduling/scorer/latency): scores endpoints by the
headroom a predicted-latency producer published (LATENCY_PREDICTIONS: headroom = SLO -
predicted, per endpoint).

- Some endpoint meets both SLOs (headroom >= 0, or no prediction): only those are scored,
  by the strategy (`least`: closest to the SLO scores highest, packing work and keeping
  idle capacity; `most`: the most headroom); the rest score 0.
- All miss: endpoints with no dispatched request, if any, are scored alone; else the least
  severe non-empty bucket (only TPOT missed, then only TTFT, then both), always by `least`
  (the smallest deficit wins).
- Within the scored set, |TTFT headroom| and |TPOT headroom| are min-max normalised (0.5
  when their range is 0, and then the other dimension takes all the weight) and blended
  by ttftWeight : tpotWeight; score = (int((1 - combined) x 100) + 1) / 100 (`least`) or
  (int(combined x 100) + 1) / 100 (`most`).
- No prediction for any endpoint (model not trained yet, producer not run): a composite of
  free KV cache, relative queue depth and prefix-cache match, weighted
  compositeKVWeight : compositeQueueWeight : compositePrefixWeight, rounded to 1/100."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import (
    LATENCY_PREDICTIONS,
    PREDICTED_LATENCY_CONSUMER,
    PREFIX_MATCH_CONSUMER,
    PREFIX_MATCH_INFO,
    LatencyPredictionInfo,
    PredictionConsumerParams,
)
from epp.framework.plugins import ConfiguredPlugin

LEAST, MOST = "least", "most"
W_MAX = 100
EPS = 1e-9


@dataclass(slots=True)
class LatencyScorerParams(PredictionConsumerParams):
    ttftWeight: float = 0.8
    tpotWeight: float = 0.2
    headroomSelectionStrategy: str = LEAST
    compositeKVWeight: float = 1.0
    compositeQueueWeight: float = 1.0
    compositePrefixWeight: float = 1.0
    prefixMatchInfoProducerName: str = ""

    def validate(self) -> None:
        for key in ("ttftWeight", "tpotWeight", "compositeKVWeight", "compositeQueueWeight", "compositePrefixWeight"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{key}: must be a finite number >= 0, got {value}")
        if self.headroomSelectionStrategy not in (LEAST, MOST):
            raise ValueError(f"headroomSelectionStrategy: must be {LEAST!r} or {MOST!r}, "
                             f"got {self.headroomSelectionStrategy!r}")


def normalized_weights(a: float, b: float) -> tuple[float, float]:
    total = a + b
    return (1.0, 0.0) if total <= 0 else (a / total, b / total)


class LatencyScorer(ConfiguredPlugin[LatencyScorerParams]):
    type_name = "latency-scorer"
    Params = LatencyScorerParams
    consumes = (PREDICTED_LATENCY_CONSUMER, PREFIX_MATCH_CONSUMER)

    def configure(self, p: LatencyScorerParams, handle: PluginHandle) -> None:
        self.weights = normalized_weights(p.ttftWeight, p.tpotWeight)
        self._key = self.producer_key(LATENCY_PREDICTIONS, PREDICTED_LATENCY_CONSUMER)
        self._prefix_key = self.producer_key(PREFIX_MATCH_INFO, PREFIX_MATCH_CONSUMER)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        published = cycle.read(self._key)
        infos = [published.endpoints.get(e) for e in endpoints] if published is not None else []
        if not any(i is not None for i in infos):
            return self.composite(cycle, endpoints)
        positive = [k for k, i in enumerate(infos) if i is None or i.positive_headroom]
        scores = [0.0] * len(endpoints)
        if positive:
            self._score_bucket(positive, infos, scores, force_least=False)
            return scores
        idle = [k for k, i in enumerate(infos) if i is not None and i.dispatched_requests == 0]
        if idle:
            self._score_bucket(idle, infos, scores, force_least=True)
            return scores
        tpot_only, ttft_only, both = [], [], []
        for k, i in enumerate(infos):
            ttft_neg, tpot_neg = i.ttft_headroom_ms < 0, i.tpot_headroom_ms < 0
            (tpot_only if tpot_neg and not ttft_neg else ttft_only if ttft_neg and not tpot_neg else both).append(k)
        bucket = tpot_only or ttft_only or both
        self._score_bucket(bucket, infos, scores, force_least=True)
        return scores

    def _score_bucket(self, bucket: list[int], infos: list[LatencyPredictionInfo | None], scores: list[float],
                      force_least: bool) -> None:
        ttft = [abs(infos[k].ttft_headroom_ms) if infos[k] is not None else 0.0 for k in bucket]
        tpot = [abs(infos[k].tpot_headroom_ms) if infos[k] is not None else 0.0 for k in bucket]
        alpha, beta = self.weights
        min_ttft, min_tpot = min(ttft), min(tpot)
        ttft_range, tpot_range = max(ttft) - min_ttft, max(tpot) - min_tpot
        if ttft_range <= EPS < tpot_range:
            alpha, beta = 0.0, 1.0
        elif tpot_range <= EPS < ttft_range:
            alpha, beta = 1.0, 0.0
        most = not force_least and self.params.headroomSelectionStrategy == MOST
        for k, h_ttft, h_tpot in zip(bucket, ttft, tpot, strict=True):
            n_ttft = (h_ttft - min_ttft) / ttft_range if ttft_range > EPS else 0.5
            n_tpot = (h_tpot - min_tpot) / tpot_range if tpot_range > EPS else 0.5
            combined = alpha * n_ttft + beta * n_tpot
            w = int(combined * W_MAX) + 1 if most else int((1.0 - combined) * W_MAX) + 1
            scores[k] = w / W_MAX

    def composite(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> list[float]:
        p = self.params
        wkv, wq, wpref = p.compositeKVWeight, p.compositeQueueWeight, p.compositePrefixWeight
        total = wkv + wq + wpref
        if total <= 0:
            wkv, wq, wpref, total = 1.0, 0.0, 0.0, 1.0
        wkv, wq, wpref = wkv / total, wq / total, wpref / total
        max_q = max((e.metrics.waiting_queue_size for e in endpoints), default=0)
        prefix = cycle.read(self._prefix_key)
        out = []
        for e in endpoints:
            m = e.metrics
            rel_queue = (max_q - m.waiting_queue_size) / max_q if max_q > 0 else 1.0
            value = wkv * (1.0 - m.kv_cache_usage_percent) + wq * rel_queue + wpref * (prefix.score(e) if prefix else 0.0)
            out.append(math.floor(W_MAX * value + 0.5) / W_MAX)  # Go's math.Round for the values >= 0 here
        return out
