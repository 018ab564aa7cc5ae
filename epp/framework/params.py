"""Strict parsing of a plugin's YAML `parameters` into its `Params` dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class PluginError(ValueError):
    """A plugin's parameters are wrong; the message names the key."""


def params_from_mapping(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """Build a plugin's `Params` dataclass from YAML parameters with strict checks:
    unknown keys and wrong types are errors naming `where.key`."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PluginError(f"{where}.{unknown[0]}: unknown parameter (known: {', '.join(sorted(fields)) or 'none'})")
    kwargs: dict[str, Any] = {}
    hints = _type_hints(cls)
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints.get(key, Any), f"{where}.{key}")
    try:
        params = cls(**kwargs)
    except TypeError as e:
        raise PluginError(f"{where}: {e}") from None
    for f in fields.values():
        bounds = f.metadata.get(_BOUNDS)
        if bounds is not None:
            _check_bounds(getattr(params, f.name), *bounds, f"{where}.{f.name}")
    check = getattr(params, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise PluginError(f"{where}.{e}") from None
    return params


_BOUNDS = "epp.bounds"


def bounded(default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """A `Params` field whose value params_from_mapping checks against bounds, e.g.
    `lruSize: int = bounded(1024, gt=0)` -> "parameters.lruSize: must be > 0, got 0".
    None (an optional parameter left out) is not checked."""
    return dataclasses.field(default=default, metadata={_BOUNDS: (gt, ge, le)})


def _check_bounds(value: Any, gt: float | None, ge: float | None, le: float | None, where: str) -> None:
    if value is None:
        return
    if gt is not None and not value > gt:
        raise PluginError(f"{where}: must be > {gt}, got {value}")
    if ge is not None and le is not None:
        if not ge <= value <= le:
            raise PluginError(f"{where}: must be in [{ge}, {le}], got {value}")
    elif ge is not None and not value >= ge:
        raise PluginError(f"{where}: must be >= {ge}, got {value}")
    elif le is not None and not value <= le:
        raise PluginError(f"{where}: must be <= {le}, got {value}")


def plugin_params(cls: type, type_name: str, values: Mapping[str, Any] | None, where: str) -> Any:
    """A plugin class's parsed `Params` (None for a plugin that has none), strictly checked."""
    params_cls = getattr(cls, "Params", None)
    if params_cls is None:
        if values:
            raise PluginError(f"{where}: plugin {type_name!r} takes no parameters")
        return None
    return params_from_mapping(params_cls, values, where)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except PluginError as e:
                errors.append(str(e))
        raise PluginError(errors[0] if errors else f"{where}: must not be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PluginError(f"{where}: expected a boolean, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise PluginError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise PluginError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise PluginError(f"{where}: expected a string, got {value!r}")
    if origin in (list, Sequence, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise PluginError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping) or hint in (dict,):
        if not isinstance(value, dict):
            raise PluginError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(hint)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise PluginError(f"{where}: expected a mapping, got {value!r}")
        return params_from_mapping(hint, value, where)
    return value


@dataclass(slots=True)
class NoParams:
    """For plugins that take no parameters."""


