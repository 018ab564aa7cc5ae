"""Assembly: a validated config -> plugin instances -> scheduler profiles -> the
PluginSet the director runs requests through. Not a contract (epp.framework holds those):
the one place that instantiates plugins from their type names and parameters."""

from __future__ import annotations

from typing import Any

from epp.config import ConfigError, EndpointPickerConfig, check_stability, load_config
from epp.framework import Plugin, PluginError, PluginHandle, SchedulerProfile, extension_points, plugin_params
from epp.framework.registry import plugin_class
from epp.requestcontrol.pluginset import PluginSet
from epp.scheduling.scheduler import Scheduler
from epp.timing import Observer

__all__ = ["build_plugin", "build_plugin_set", "load_plugin_set"]


def build_plugin(type_name: str, name: str | None, parameters: dict[str, Any] | None,
                 handle: PluginHandle, where: str) -> Plugin:
    cls = plugin_class(type_name, f"{where}.type")
    return cls(name or type_name, plugin_params(cls, type_name, parameters, f"{where}.parameters"), handle)


def _profile(plugins: dict[str, Plugin], spec: Any) -> SchedulerProfile:
    filters, scorers, picker = [], [], None
    for ref in spec.plugins:
        p = plugins[ref.plugin_ref]
        points = extension_points(p)
        if "Filter" in points:
            filters.append(p)
        if "Scorer" in points:
            scorers.append((p, ref.weight))
        if "Picker" in points:
            picker = p
    assert picker is not None  # config resolution guarantees one
    return SchedulerProfile(spec.name, filters, scorers, picker)


def build_plugin_set(config: EndpointPickerConfig, handle: PluginHandle | None = None, *,
                     observe: Observer | None = None) -> PluginSet:
    """Instantiate every plugin of `config` (in order, so later plugins can look up earlier
    ones through the handle) and wire profiles, handler and saturation detector."""
    handle = handle if handle is not None else PluginHandle()
    plugins: dict[str, Plugin] = {}
    handle.plugins = plugins  # plugins see the instances built so far (and later ones at run time)
    for spec in config.plugins:
        try:
            plugins[spec.name] = build_plugin(spec.type, spec.name, spec.parameters, handle, spec.where)
        except PluginError as e:
            raise ConfigError(str(e)) from None
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{spec.where}: {e}") from None
    profiles = {spec.name: _profile(plugins, spec) for spec in config.scheduling_profiles}
    handler = plugins[config.profile_handler]
    check = getattr(handler, "check_profiles", None)
    if check is not None:  # e.g. the P/D handler needs its decode and prefill profiles
        try:
            check(list(profiles))
        except ValueError as e:
            where = config.plugin(config.profile_handler).where
            raise ConfigError(f"{where}.{e}") from None
    return PluginSet(config, plugins, Scheduler(profiles, handler), observe)


def load_plugin_set(text: str | None, handle: PluginHandle | None = None, *,
                    observe: Observer | None = None, allow_experimental_plugins: bool = True) -> PluginSet:
    """The PluginSet of a config text. `epp serve` passes --allow-experimental-plugins
    (default off there, as in the reference); library and test callers get every stability level."""
    config = load_config(text)
    check_stability(config, allow_experimental_plugins)
    return build_plugin_set(config, handle, observe=observe)
