"""ConfigError and the value checks every section of an EndpointPickerConfig shares (epp.config,
epp.flowcontrol.config): each error message starts with the offending key path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from epp import units
from epp.yamlcheck import expect_int, expect_list


class ConfigError(ValueError):
    """Bad configuration: the message names the key path."""


# --------------------------------------------------------------------------- value parsers
def parse_quantity(value: Any, where: str) -> int:
    """Kubernetes quantity ("10Gi", "500M", 1e9, 1024) -> an integer count of bytes."""
    return units.parse_quantity(value, where, ConfigError)


def parse_duration(value: Any, where: str) -> float:
    """Go duration ("60s", "1m30s", "200ms") or a number of seconds -> seconds."""
    return units.duration_value(value, where, ConfigError)


# --------------------------------------------------------------------------- structural checks
def check_mapping(value: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    for key in value:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(allowed)})")
    return value


def check_list(value: Any, where: str) -> list[Any]:
    return expect_list(value, where, ConfigError)


def check_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def check_int(value: Any, where: str) -> int:
    return expect_int(value, where, ConfigError)


def check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)
