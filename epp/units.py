"""Durations and quantities, parsed one way for flags, the config file, plugin
parameters and environment variables.

Durations are Go's `time.ParseDuration` units ("50ms", "1m30s", "2h") or a plain
number of seconds; quantities are Kubernetes resource quantities ("10Gi", "500M",
"1e9") or a plain number. Values must be finite and non-negative."""

from __future__ import annotations

import argparse
import math
import re
from typing import Any

__all__ = ["UnitError", "duration_value", "parse_duration", "parse_quantity"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?$")
_QUANTITY_UNITS = {
    None: 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
MAX_TEXT = 64  # longest duration or quantity text considered (a longer one is an error, not a regex walk)


class UnitError(ValueError, argparse.ArgumentTypeError):
    """A bad duration or quantity. A ValueError for callers, and argparse shows its
    message as is when a flag's type function raises it."""


def parse_duration(text: str) -> float:
    """Go duration ("50ms", "1m30s", "2s") or plain seconds -> seconds (finite, >= 0)."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = _go_duration(text)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise UnitError(f"invalid duration {text[:MAX_TEXT]!r} (e.g. 50ms, 2s, 1m)")
    return seconds


def _go_duration(text: str) -> float | None:
    if not text or len(text) > MAX_TEXT:
        return None
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total if pos == len(text) else None


def duration_value(value: Any, where: str, error: type[ValueError] = UnitError) -> float:
    """A duration from YAML (a Go duration string or a number of seconds) -> seconds.
    Errors are `error("<where>: ...")`, so a config loader can raise its own type."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise error(f"{where}: must not be negative, got {value!r}")
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, str):
        try:
            return parse_duration(value)
        except UnitError:
            if value.strip().startswith("-"):
                raise error(f"{where}: must not be negative, got {value!r}") from None
    raise error(f"{where}: expected a duration like 60s, got {value!r}")


def parse_quantity(value: Any, where: str, error: type[ValueError] = UnitError) -> int:
    """Kubernetes quantity ("10Gi", "500M", 1e9, 1024) -> an integer count (e.g. bytes).
    Errors are `error("<where>: ...")`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise error(f"{where}: must not be negative, got {value!r}")
        if math.isfinite(value):
            return int(value)
    elif isinstance(value, str) and len(value) <= MAX_TEXT:
        m = _QUANTITY.match(value.strip())
        if m:
            amount = float(m.group(1)) * _QUANTITY_UNITS[m.group(2)]
            if math.isfinite(amount):
                return int(amount)
    raise error(f"{where}: expected a quantity like 10Gi, got {value!r}")
