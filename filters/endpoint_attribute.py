"""endpoint-attribute-filter (the reference's scheduling/filter/endpointattribute/): keeps
the endpoints whose numeric attribute compares true against algorithm.threshold
{operator, value} (operators LessThan, LessThanOrEqual, GreaterThan, GreaterThanOrEqual,
Equal, NotEqual; algorithm.type threshold, the only one). The attribute is a custom scalar
metric of the core metrics extractor (producer omitted or core-metrics-extractor); other
producers' attributes are refused at start-up naming the feature. An endpoint without the
attribute (or with a non-finite value) is kept with onMissing Pass (the default), dropped
with Fail. When every endpoint is dropped and fallbackOnEmpty (false) is set, the
candidates are returned unchanged."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.attributes import read_scalar, resolve_attribute
from epp.framework.plugins import ConfiguredPlugin

PASS, FAIL = "Pass", "Fail"
THRESHOLD = "threshold"
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "LessThan": operator.lt,
    "LessThanOrEqual": operator.le,
    "GreaterThan": operator.gt,
    "GreaterThanOrEqual": operator.ge,
    "Equal": operator.eq,
    "NotEqual": operator.ne,
}


@dataclass(slots=True)
class ThresholdParams:
    operator: str = ""
    value: float = 0.0


@dataclass(slots=True)
class AlgorithmParams:
    type: str = ""
    threshold: ThresholdParams | None = None


@dataclass(slots=True)
class EndpointAttributeFilterParams:
    attribute: str = ""
    producer: str | None = None  # None: core-metrics-extractor
    onMissing: str = ""  # "": Pass
    fallbackOnEmpty: bool = False
    algorithm: AlgorithmParams = field(default_factory=AlgorithmParams)

    def validate(self) -> None:
        if not self.attribute:
            raise ValueError("attribute: a non-empty attribute is required")
        if self.onMissing not in ("", PASS, FAIL):
            raise ValueError(f"onMissing: must be {PASS!r} or {FAIL!r}, got {self.onMissing!r}")
        if self.algorithm.type != THRESHOLD:
            raise ValueError(f"algorithm.type: must be {THRESHOLD!r}, got {self.algorithm.type!r}")
        t = self.algorithm.threshold
        if t is None:
            raise ValueError(f"algorithm.threshold: required when algorithm.type is {THRESHOLD!r}")
        if t.operator not in OPERATORS:
            raise ValueError(f"algorithm.threshold.operator: must be one of {', '.join(OPERATORS)}, got {t.operator!r}")
        if t.value != t.value:
            raise ValueError("algorithm.threshold.value: must be a number, got nan")
        resolve_attribute(self.attribute, self.producer)


class EndpointAttributeFilter(ConfiguredPlugin[EndpointAttributeFilterParams]):
    type_name = "endpoint-attribute-filter"
    Params = EndpointAttributeFilterParams

    def configure(self, p: EndpointAttributeFilterParams, handle: PluginHandle) -> None:
        assert p.algorithm.threshold is not None
        self.key = resolve_attribute(p.attribute, p.producer)
        self.pass_on_missing = p.onMissing != FAIL
        self.fallback = p.fallbackOnEmpty
        self.compare = OPERATORS[p.algorithm.threshold.operator]
        self.value = float(p.algorithm.threshold.value)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        kept = []
        for e in endpoints:
            v = read_scalar(e, self.key)
            if (self.pass_on_missing if v is None else self.compare(v, self.value)):
                kept.append(e)
        if not kept and self.fallback:
            return endpoints
        return kept
