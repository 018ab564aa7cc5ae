"""Usage-limit policies: the saturation ceiling of each priority band.

The reference's static-usage-limit-policy (pkg/epp/framework/plugins/flowcontrol/
usagelimits/usagelimitpolicy.go): every band's ceiling is `threshold` (default 1.0, no
gating below saturation). Each dispatch cycle the queues ask `compute_limit(saturation,
priorities)` (highest priority first) and stop at the first band whose ceiling the
pool's saturation has reached (head-of-line blocking: lower bands wait too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import PluginHandle
from epp.framework.plugins import ConfiguredPlugin


@dataclass(slots=True)
class StaticUsageLimitParams:
    threshold: float = 1.0

    def validate(self) -> None:
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold: must be a finite number, got {self.threshold}")


class StaticUsageLimitPolicy(ConfiguredPlugin[StaticUsageLimitParams]):
    type_name = "static-usage-limit-policy"
    Params = StaticUsageLimitParams

    def configure(self, p: StaticUsageLimitParams, handle: PluginHandle) -> None:
        self.threshold = p.threshold

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        return [self.threshold] * len(priorities)


@dataclass(slots=True)
class PriorityHoldbackParams:
    minCeiling: float | None = None  # required
    maxCeiling: float = 1.0
    shape: str = "linear"
    domain: str = "rank"  # or "value"

    def validate(self) -> None:
        if self.minCeiling is None:
            raise ValueError("minCeiling: required")
        if self.shape != "linear":
            raise ValueError(f"shape: unsupported {self.shape!r}, must be 'linear'")
        if self.domain not in ("rank", "value"):
            raise ValueError(f"domain: unsupported {self.domain!r}, must be one of: 'rank', 'value'")
        if not 0.0 <= self.minCeiling < 1.0:
            raise ValueError(f"minCeiling: must be in [0.0, 1.0), got {self.minCeiling}")
        if not 0.0 < self.maxCeiling <= 1.0:
            raise ValueError(f"maxCeiling: must be in (0.0, 1.0], got {self.maxCeiling}")
        if self.minCeiling >= self.maxCeiling:
            raise ValueError(f"minCeiling: ({self.minCeiling}) must be strictly less than maxCeiling "
                             f"({self.maxCeiling})")


class PriorityHoldbackPolicy(ConfiguredPlugin[PriorityHoldbackParams]):
    """Lower bands get lower ceilings, so they hold back before the pool saturates
    (usagelimits/priorityholdback): the highest band maxCeiling, the lowest minCeiling, in
    between linear by rank (domain rank) or by priority value (domain value). One band:
    maxCeiling."""

    type_name = "priority-holdback-policy"
    Params = PriorityHoldbackParams

    def configure(self, p: PriorityHoldbackParams, handle: PluginHandle) -> None:
        assert p.minCeiling is not None
        self.c_min, self.c_max, self.by_value = p.minCeiling, p.maxCeiling, p.domain == "value"

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        n = len(priorities)
        if n <= 1:
            return [self.c_max] * n
        spread = self.c_max - self.c_min
        if not self.by_value:
            return [self.c_max - i * spread / (n - 1) for i in range(n)]
        p_min, p_max = priorities[-1], priorities[0]
        if p_max == p_min:
            return [self.c_max] * n
        return [self.c_min + (p - p_min) / (p_max - p_min) * spread for p in priorities]


class SoftReflectiveCeilingPolicy:
    """No parameters (usagelimits/softreflectiveceiling): the highest band is never held;
    band i of n is open while saturation < 1 - i x saturation / (n - 1), closed at
    saturation >= 1, and in between opened one cycle in round(s / (1 - s)) while the
    saturation s is in [0.5, 1) (a counter of the cycles asked), closed otherwise."""

    type_name = "soft-reflective-ceiling-policy"

    def __init__(self, name: str, params: None = None, handle: PluginHandle | None = None) -> None:
        self.name = name
        self.tick = 0

    def compute_limit(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        n = len(priorities)
        if n <= 1:
            return [1.0] * n
        alternating = 1.0 - saturation <= saturation < 1.0
        is_open = False
        if alternating:
            period = max(1, math.floor(saturation / (1.0 - saturation + 1e-9) + 0.5))  # Go's math.Round
            self.tick += 1
            is_open = self.tick % period == 0
        out = [1.0]
        for i in range(1, n):
            reflective = 1.0 - i * saturation / (n - 1)
            if saturation < reflective:
                out.append(1.0)
            elif saturation >= 1.0:
                out.append(0.0)
            else:
                out.append(1.0 if is_open else 0.0)
        return out
