"""endpoint-attribute-scorer (the reference's scheduling/scorer/endpointattribute/): scores
by a numeric endpoint attribute (attributeKey; a custom scalar metric of the core metrics
extractor: producer omitted or core-metrics-extractor; other producers are refused at
start-up naming the feature), linearly normalised: (v - min) / (max - min), inverted for
algorithm.type linear_lower_is_better, as is for linear_higher_is_better.
- algorithm.normalization.adaptiveRange (the default): min/max over the candidates that have
  the attribute; when they all share one value each scores 1.0;
- algorithm.normalization.fixedRange {min, max} (min < max): values clamped to the range.
An endpoint without the attribute (or with a non-finite value) scores 0 and takes no part in
the adaptive range."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.attributes import read_scalar, resolve_attribute
from epp.framework.plugins import ConfiguredPlugin

LOWER_IS_BETTER, HIGHER_IS_BETTER = "linear_lower_is_better", "linear_higher_is_better"


@dataclass(slots=True)
class FixedRange:
    min: float = 0.0
    max: float = 0.0


@dataclass(slots=True)
class AdaptiveRange:
    pass


@dataclass(slots=True)
class Normalization:
    fixedRange: FixedRange | None = None
    adaptiveRange: AdaptiveRange | None = None


@dataclass(slots=True)
class Algorithm:
    type: str = ""
    normalization: Normalization = field(default_factory=Normalization)


@dataclass(slots=True)
class EndpointAttributeScorerParams:
    attributeKey: str = ""
    producer: str | None = None  # None: core-metrics-extractor
    algorithm: Algorithm = field(default_factory=Algorithm)

    def validate(self) -> None:
        if not self.attributeKey:
            raise ValueError("attributeKey: a non-empty attributeKey is required")
        if self.algorithm.type not in (LOWER_IS_BETTER, HIGHER_IS_BETTER):
            raise ValueError(f"algorithm.type: must be {LOWER_IS_BETTER!r} or {HIGHER_IS_BETTER!r}, "
                             f"got {self.algorithm.type!r}")
        n = self.algorithm.normalization
        if n.fixedRange is not None and n.adaptiveRange is not None:
            raise ValueError("algorithm.normalization: at most one normalization strategy, got both fixedRange "
                             "and adaptiveRange")
        f = n.fixedRange
        if f is not None and not f.min < f.max:
            raise ValueError(f"algorithm.normalization.fixedRange: requires min < max, got min {f.min}, max {f.max}")
        resolve_attribute(self.attributeKey, self.producer, "attributeKey")


class EndpointAttributeScorer(ConfiguredPlugin[EndpointAttributeScorerParams]):
    type_name = "endpoint-attribute-scorer"
    Params = EndpointAttributeScorerParams

    def configure(self, p: EndpointAttributeScorerParams, handle: PluginHandle) -> None:
        self.key = resolve_attribute(p.attributeKey, p.producer, "attributeKey")
        self.lower_is_better = p.algorithm.type == LOWER_IS_BETTER
        f = p.algorithm.normalization.fixedRange
        self.fixed = (float(f.min), float(f.max)) if f is not None else None

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        values = [read_scalar(e, self.key) for e in endpoints]
        present = [v for v in values if v is not None]
        if not present:
            return [0.0] * len(endpoints)
        if self.fixed is not None:
            lo, hi = self.fixed
            clamp = True
        else:
            lo, hi = min(present), max(present)
            clamp = False
            if lo == hi:
                return [0.0 if v is None else 1.0 for v in values]
        out = []
        for v in values:
            if v is None:
                out.append(0.0)
                continue
            x = (v - lo) / (hi - lo)
            if clamp:
                x = max(0.0, min(1.0, x))
            out.append(1.0 - x if self.lower_is_better else x)
        return out
