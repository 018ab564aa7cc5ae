"""The result of the director's dry run (the project API's Explain)."""

from __future__ import annotations

from dataclasses import dataclass, field

from epp.framework import InferenceRequest
from epp.framework.datakeys import LatencyPredictions, PrefixCacheMatchInfo
from epp.scheduling.scheduler import SchedulingTrace

__all__ = ["ExplainResult"]


@dataclass(slots=True)
class ExplainResult:
    """What the director's explain returns. Endpoint references are endpoint names;
    "ip:port" strings are accepted too and shown as the endpoint's name."""

    request: InferenceRequest | None = None  # as parsed, after rewrite and objective lookup
    candidates: list[str] = field(default_factory=list)
    trace: SchedulingTrace | None = None
    primary_profile: str = ""
    targets: list[str] = field(default_factory=list)  # primary profile's picks, primary first
    headers: dict[str, str] = field(default_factory=dict)  # headers the picker would set upstream
    error_code: str = ""  # an epp.errors code when the request would fail
    error_message: str = ""
    prefix_matches: dict[str, PrefixCacheMatchInfo] = field(default_factory=dict)  # producer name -> its match
    # producer name -> the latencies it predicted per endpoint, with headroom against the request's SLOs
    latency_predictions: dict[str, LatencyPredictions] = field(default_factory=dict)
