"""Plugin type name -> plugin class.

Built-ins register themselves with `@register`; third-party plugins come from the
`epp.plugins` entry-point group (name = type name, value = "module:Class") or are
named directly in the config as "module:Class".

A plugin class has:
  type_name: ClassVar[str]
  Params: a dataclass of its YAML parameters (camelCase names, as in the reference)
  __init__(self, name: str, params: Params, handle: PluginHandle)
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from epp.framework import Plugin, PluginError, PluginHandle, params_from_mapping

ENTRY_POINT_GROUP = "epp.plugins"
_BUILTIN_MODULES = (
    "filters",
    "scorers",
    "epp.scheduling.pickers",
    "epp.scheduling.profiles",
    "epp.flowcontrol.saturation",
)
_registry: dict[str, type] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator for built-in plugins."""
    name = getattr(cls, "type_name", None)
    if not name:
        raise TypeError(f"{cls.__name__} has no type_name")
    _registry[name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)


def plugin_class(type_name: str, where: str = "type") -> type:
    """Resolve a type name: built-in, entry point, or "module:Class"."""
    _load_builtins()
    if type_name in _registry:
        return _registry[type_name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == type_name:
            try:
                cls = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken third-party package must not crash start-up
                raise PluginError(f"{where}: cannot load plugin {type_name!r} from entry point {ep.value!r}: {e}") from None
            _registry[type_name] = cls
            return cls
    if ":" in type_name:
        module, _, attr = type_name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise PluginError(f"{where}: cannot load plugin {type_name!r}: {e}") from None
        _registry[type_name] = cls
        return cls
    raise PluginError(f"{where}: unknown plugin type {type_name!r} (known: {', '.join(sorted(_registry))})")


def build_plugin(type_name: str, name: str | None, parameters: dict[str, Any] | None,
                 handle: PluginHandle, where: str) -> Plugin:
    cls = plugin_class(type_name, f"{where}.type")
    params_cls = getattr(cls, "Params", None)
    if params_cls is None:
        if parameters:
            raise PluginError(f"{where}.parameters: plugin {type_name!r} takes no parameters")
        params = None
    else:
        params = params_from_mapping(params_cls, parameters, f"{where}.parameters")
    return cls(name or type_name, params, handle)


def known_types() -> list[str]:
    _load_builtins()
    return sorted(_registry)
