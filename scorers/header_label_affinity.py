"""header-label-affinity-scorer (the reference's scheduling/scorer/headerlabelaffinity/):
an endpoint whose label `labelKey` equals the value of the request header `headerName`
scores 1, every other endpoint 0; no header (or an empty one) scores all 0. Both
parameters are required; the header name is matched lowercased, the value exactly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.plugins import ConfiguredPlugin


@dataclass(slots=True)
class HeaderLabelAffinityParams:
    headerName: str = ""
    labelKey: str = ""

    def validate(self) -> None:
        if not self.headerName:
            raise ValueError("headerName: required")
        if not self.labelKey:
            raise ValueError("labelKey: required")


class HeaderLabelAffinityScorer(ConfiguredPlugin[HeaderLabelAffinityParams]):
    type_name = "header-label-affinity-scorer"
    Params = HeaderLabelAffinityParams

    def configure(self, p: HeaderLabelAffinityParams, handle: PluginHandle) -> None:
        self.header = p.headerName.lower()
        self.label = p.labelKey

    def score(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> list[float]:
        wanted = request.headers.get(self.header, "")
        if not wanted:
            return [0.0] * len(endpoints)
        key = self.label
        return [1.0 if e.labels.get(key) == wanted else 0.0 for e in endpoints]
