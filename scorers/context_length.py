"""context-length-aware: match requests to endpoints by the label
`llm-d.ai/context-length-range: "min-max"` (tokens).

Score: in range: 0.3 + 0.7 * (w_min + 1) / (w + 1), where w is the endpoint's range width
and w_min the narrowest in-range width among candidates, so the narrowest range scores 1.0
and wider ones tend to 0.3 (specialised servers first). Out of range: 0.3 / (1 + d / (w + 1)),
d = how far the request's length lies outside, in [0, 0.3). No or bad label: 0.5.
With enableFiltering, endpoints out of range are removed (unlabelled ones are kept)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CONTEXT_LENGTH_RANGE_LABEL, CycleState, Endpoint, InferenceRequest, PluginHandle


def parse_range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    lo, sep, hi = text.strip().partition("-")
    try:
        lo_v = int(lo)
        hi_v = int(hi) if hi.strip() else 2**62
    except ValueError:
        return None
    if not sep or lo_v < 0 or hi_v < lo_v:
        return None
    return lo_v, hi_v


def request_context_length(request: InferenceRequest) -> int:
    return request.estimated_prompt_tokens + (request.max_tokens or 0)


@dataclass(slots=True)
class ContextLengthParams:
    enableFiltering: bool = False
    label: str = CONTEXT_LENGTH_RANGE_LABEL


class ContextLengthAware:
    type_name = "context-length-aware"
    Params = ContextLengthParams

    def __init__(self, name: str, params: ContextLengthParams | None, handle: PluginHandle) -> None:
        p = params or ContextLengthParams()
        self.name = name
        self.filtering = p.enableFiltering
        self.label = p.label

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        n = request_context_length(request)
        ranges = [parse_range(e.labels.get(self.label)) for e in endpoints]
        in_widths = [hi - lo for r in ranges if r is not None for lo, hi in (r,) if lo <= n <= hi]
        w_min = min(in_widths, default=0)
        out = []
        for r in ranges:
            if r is None:
                out.append(0.5)
                continue
            lo, hi = r
            w = hi - lo
            if lo <= n <= hi:
                out.append(0.3 + 0.7 * (w_min + 1) / (w + 1))
            else:
                d = lo - n if n < lo else n - hi
                out.append(0.3 / (1.0 + d / (w + 1)))
        return out

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if not self.filtering:
            return endpoints
        n = request_context_length(request)
        kept = []
        for e in endpoints:
            r = parse_range(e.labels.get(self.label))
            if r is None or r[0] <= n <= r[1]:
                kept.append(e)
        return kept
