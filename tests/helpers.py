"""Small builders shared by the plugin tests: an endpoint, a plugin built through the
registry with a seeded handle."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import pytest

from epp.assembly import build_plugin
from epp.config import ConfigError, load_config
from epp.framework import Endpoint, Metrics, Plugin, PluginHandle, ProfileRunResult, SchedulingResult


def ep(i: int, labels: Mapping[str, str] | None = None, namespace: str = "default", **metrics) -> Endpoint:
    """Endpoint e<i> at 10.0.0.<i>:8000 with these labels and metrics."""
    return Endpoint(f"e{i}", f"10.0.0.{i}", 8000, labels=labels or {}, namespace=namespace,
                    metrics=Metrics(**metrics))


def plugin(ptype: str, params: Mapping | None = None, clock: Callable[[], float] | None = None,
           where: str = "test", seed: int = 3) -> Plugin:
    """A plugin of type `ptype` built as the config loader builds it (handle seeded)."""
    h = PluginHandle(rng=random.Random(seed))
    if clock is not None:
        h.clock = clock
    return build_plugin(ptype, None, params, h, where)


def result(target: Endpoint | None, profile: str = "default", **others: Endpoint) -> SchedulingResult:
    """A scheduling result whose primary `profile` picked `target` (None: that profile ran
    without a pick), each of `others` (profile=endpoint) its endpoint."""
    pr = {profile: ProfileRunResult([target]) if target is not None else None}
    pr.update({k: ProfileRunResult([v]) for k, v in others.items()})
    return SchedulingResult(pr, profile)


def errmsg(text: str) -> str:
    """The ConfigError message loading this EndpointPickerConfig text gives."""
    with pytest.raises(ConfigError) as e:
        load_config(text)
    return str(e.value)
