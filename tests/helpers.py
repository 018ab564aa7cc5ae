"""Small builders shared by the plugin tests: an endpoint, a plugin built through the
registry with a seeded handle, a model rewrite, a clock moved by hand; and by the admission tests: a
saturation-detector config, an admission controller built from a config, a bounded wait for a condition."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import pytest

from epp.assembly import build_plugin, load_plugin_set
from epp.config import ConfigError, load_config
from epp.datalayer.datastore import ModelRewrite, RewriteRule, RewriteTarget
from epp.flowcontrol.admission import AdmissionController, gated_flow_control
from epp.framework import Endpoint, Metrics, Plugin, PluginHandle, ProfileRunResult, SchedulingResult
from tests.servers import eventually


def ep(i: int, labels: Mapping[str, str] | None = None, namespace: str = "default", **metrics) -> Endpoint:
    """Endpoint e<i> at 10.0.0.<i>:8000 with these labels and metrics."""
    return Endpoint(f"e{i}", f"10.0.0.{i}", 8000, labels=labels or {}, namespace=namespace,
                    metrics=Metrics(**metrics))


def plugin(ptype: str, params: Mapping | None = None, clock: Callable[[], float] | None = None,
           where: str = "test", seed: int = 3, name: str | None = None) -> Plugin:
    """A plugin of type `ptype` (named `name`, by default its type) built as the config loader
    builds it (handle seeded)."""
    h = PluginHandle(rng=random.Random(seed))
    if clock is not None:
        h.clock = clock
    return build_plugin(ptype, name, params, h, where)


class Clock:
    """A clock the test moves by hand: it reads `now` (seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def result(target: Endpoint | None, profile: str = "default", **others: Endpoint) -> SchedulingResult:
    """A scheduling result whose primary `profile` picked `target` (None: that profile ran
    without a pick), each of `others` (profile=endpoint) its endpoint."""
    pr = {profile: ProfileRunResult([target]) if target is not None else None}
    pr.update({k: ProfileRunResult([v]) for k, v in others.items()})
    return SchedulingResult(pr, profile)


def rewrite(matches: Sequence[str], *targets: str | tuple[str, int], name: str = "rw") -> ModelRewrite:
    """A one-rule InferenceModelRewrite: a request for any of `matches` (none: every model)
    goes to one of `targets`, each a model name (weight 1) or (name, weight)."""
    weighted = (RewriteTarget(t) if isinstance(t, str) else RewriteTarget(*t) for t in targets)
    return ModelRewrite(name, (RewriteRule(tuple(matches), tuple(weighted)),))


def errmsg(text: str) -> str:
    """The ConfigError message loading this EndpointPickerConfig text gives."""
    with pytest.raises(ConfigError) as e:
        load_config(text)
    return str(e.value)


def plugin_set_error(text: str, errors: type[Exception] | tuple[type[Exception], ...] = ConfigError) -> str:
    """The message of the error (one of `errors`) building the plugin set of this config text
    (handle seeded) raises."""
    with pytest.raises(errors) as e:
        load_plugin_set(text, PluginHandle(rng=random.Random(1)))
    return str(e.value)


# queue-scorer profile, utilization-detector (metrics never stale) as the saturation detector;
# %s takes more plugin list items ("" for none)
DETECTOR_CONFIG = """
plugins:
- type: queue-scorer
- type: utilization-detector
  parameters: {metricsStalenessThreshold: 1h}
%s
schedulingProfiles: [{name: default, plugins: [{pluginRef: queue-scorer}]}]
saturationDetector: {pluginRef: utilization-detector}
"""


def admission_controller(text: str, pool: Callable[[], Sequence[Endpoint]] | None = None) -> AdmissionController:
    """The admission controller this config text makes (flow control if its feature gate is on),
    polling every 5 ms; `pool` is the live pool its dispatcher samples."""
    p = load_plugin_set(text, PluginHandle(rng=random.Random(1)))
    return AdmissionController(p.saturation_detector, flow_control=gated_flow_control(p.feature_gates, p.flow_control),
                               policies=p.plugins, pool=pool, poll_interval=0.005)


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until pred() holds; fails after `timeout` seconds (tests.servers.eventually)."""
    await eventually(pred, "the condition", timeout)
