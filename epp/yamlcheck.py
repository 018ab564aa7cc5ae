"""Checks of parsed YAML values shared by the config loader (epp.config) and the static
endpoints file (epp.discovery.static): each returns the value or raises the caller's
error class with a message naming where the value stands."""

from __future__ import annotations

from typing import Any


def expect_list(value: Any, where: str, error: type[ValueError] = ValueError) -> list[Any]:
    """A list; None (an absent key) is the empty list."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise error(f"{where}: expected a list, got {value!r}")
    return value


def expect_int(value: Any, where: str, error: type[ValueError] = ValueError) -> int:
    """An integer (YAML true/false is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{where}: expected an integer, got {value!r}")
    return value
