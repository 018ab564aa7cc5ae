"""context-length-aware (the reference's scheduling/scorer/contextlengthaware/
context_length_aware.go): match requests to endpoints by the label
`llm-d.ai/context-length-range: "min-max"` (tokens), against the prompt's token count from
the token producer (the config loader adds one when none is configured; without a count the
length is 0).

Score, for a range of width w = max - min: in range, 0.3 + 0.7 * (0.7 / (1 + w / 10000) +
0.3 * (max - n) / w) (w = 0: 1.0), so narrow ranges with headroom come first; out of range,
0.3 / (1 + d / 1000), d = how far n lies outside. No label: 0.5; a label that is not
"min-max" with min <= max: 0.0. With enableFiltering, endpoints out of range or with a bad
label are removed (unlabelled ones are kept)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CONTEXT_LENGTH_RANGE_LABEL, CycleState, Endpoint, InferenceRequest
from epp.framework.datakeys import TOKENIZED_PROMPT, TOKENS_CONSUMER
from epp.framework.plugins import ConfiguredPlugin

MAX_FALLBACK_SCORE = 0.3


def parse_range(text: str) -> tuple[int, int] | None:
    """"min-max" -> (min, max); None when malformed or min > max."""
    parts = text.split("-")
    if len(parts) != 2:
        return None
    try:
        lo, hi = int(parts[0].strip()), int(parts[1].strip())
    except ValueError:
        return None
    return (lo, hi) if lo <= hi else None


def range_score(n: int, lo: int, hi: int) -> float:
    if lo <= n <= hi:
        w = hi - lo
        if w == 0:
            return 1.0
        raw = 0.7 * (1.0 / (1.0 + w / 10000.0)) + 0.3 * ((hi - n) / w)
        return MAX_FALLBACK_SCORE + raw * (1.0 - MAX_FALLBACK_SCORE)
    d = n - hi if n > hi else lo - n
    return MAX_FALLBACK_SCORE / (1.0 + d / 1000.0)


@dataclass(slots=True)
class ContextLengthParams:
    enableFiltering: bool = False
    label: str = CONTEXT_LENGTH_RANGE_LABEL

    def validate(self) -> None:
        if not self.label:
            raise ValueError("label: must be specified")


class ContextLengthAware(ConfiguredPlugin[ContextLengthParams]):
    type_name = "context-length-aware"
    Params = ContextLengthParams
    consumes = (TOKENS_CONSUMER,)

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        n = cycle.read(TOKENIZED_PROMPT) or 0
        out = []
        for e in endpoints:
            text = e.labels.get(self.params.label)
            if text is None:
                out.append(0.5)
                continue
            r = parse_range(text)
            out.append(0.0 if r is None else range_score(n, *r))
        return out

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if not self.params.enableFiltering:
            return endpoints
        n = cycle.read(TOKENIZED_PROMPT) or 0
        kept = []
        for e in endpoints:
            text = e.labels.get(self.params.label)
            if text is None:
                kept.append(e)
                continue
            r = parse_range(text)
            if r is not None and r[0] <= n <= r[1]:
                kept.append(e)
        return kept
