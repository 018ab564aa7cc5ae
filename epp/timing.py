"""The one timing helper every extension point runs its plugins through.

`timed(point, plugin, method, observe)` is what the runners call in place of `method`:
the method itself when nothing observes (zero overhead), else a wrapper that reports
observe(extension_point, plugin_type, plugin_name, seconds) after each call (telemetry's
inference_extension_plugin_duration_seconds). Runners build their call lists once and
again when the observer changes, never per request.

An observer may carry `bind(extension_point, plugin_type, plugin_name)`, returning a
resolver `() -> record(seconds)`: the wrapper then resolves its label set once, at its
first call (so a series still appears only once its plugin has run), and records
straight to it, skipping the per-call label lookup."""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any, TypeVar

# observe(extension_point, plugin_type, plugin_name, seconds)
Observer = Callable[[str, str, str, float], None]

F = TypeVar("F", bound=Callable[..., Any])


def type_name(plugin: object) -> str:
    return getattr(plugin, "type_name", type(plugin).__name__)


def timed(point: str, plugin: Any, method: F, observe: Observer | None) -> F:
    if observe is None:
        return method
    ptype, name = type_name(plugin), plugin.name
    bind = getattr(observe, "bind", None)
    if bind is not None:
        return _bound(method, bind(point, ptype, name))

    def call(*args: Any) -> Any:
        t0 = perf_counter()
        out = method(*args)
        observe(point, ptype, name, perf_counter() - t0)
        return out

    return call  # type: ignore[return-value]


def _bound(method: F, resolve: Callable[[], Callable[[float], None]]) -> F:
    record: Callable[[float], None] | None = None

    def call(*args: Any) -> Any:
        nonlocal record
        t0 = perf_counter()
        out = method(*args)
        seconds = perf_counter() - t0
        if record is None:
            record = resolve()
        record(seconds)
        return out

    return call  # type: ignore[return-value]


class Observed:
    """Base of a runner that builds its `timed` call lists once per observer: setting
    `observe` stores the observer and calls `_rebuild(observer)`."""

    _observe: Observer | None = None

    @property
    def observe(self) -> Observer | None:
        return self._observe

    @observe.setter
    def observe(self, fn: Observer | None) -> None:
        self._observe = fn
        self._rebuild(fn)

    def _rebuild(self, fn: Observer | None) -> None:
        raise NotImplementedError
