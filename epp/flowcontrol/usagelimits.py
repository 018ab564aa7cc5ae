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
