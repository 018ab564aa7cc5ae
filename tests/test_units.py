"""epp.units: one Go-duration and Kubernetes-quantity parser for flags, the config file,
plugin parameters and the environment."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from epp.units import UnitError, duration_value, parse_duration, parse_quantity

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(UNITS))), min_size=1, max_size=4))
def test_go_durations_sum_their_parts(parts):
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert parse_duration(text) == pytest.approx(sum(n * UNITS[u] for n, u in parts))
    assert duration_value(text, "k") == parse_duration(text)


@settings(max_examples=100, deadline=None)
@given(seconds=st.floats(0, 1e9, allow_nan=False))
def test_plain_seconds(seconds):
    assert parse_duration(repr(seconds)) == seconds
    assert duration_value(seconds, "k") == seconds


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
@example("nan")
@example("inf")
@example("-1s")
@example("1e400")
@example("5 s")
@example("1" * 100 + "h")
def test_any_text_is_a_finite_duration_or_a_clean_error(text):
    try:
        seconds = parse_duration(text)
    except UnitError as e:
        assert isinstance(e, ValueError) and isinstance(e, argparse.ArgumentTypeError)
        assert str(e).startswith("invalid duration ")
    else:
        assert math.isfinite(seconds) and seconds >= 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 10**6), unit=st.sampled_from(sorted(QUANTITY_UNITS)))
def test_quantities_scale_by_their_suffix(n, unit):
    assert parse_quantity(f"{n}{unit}", "k") == n * QUANTITY_UNITS[unit]


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=80), st.floats(), st.integers(), st.booleans(), st.none()))
@example("1e400")
@example(float("nan"))
@example(-1)
def test_any_value_is_a_count_or_a_clean_error(value):
    try:
        n = parse_quantity(value, "spec.maxBytes")
    except UnitError as e:
        assert str(e).startswith("spec.maxBytes: ")
    else:
        assert isinstance(n, int) and n >= 0


def test_errors_carry_the_callers_type_and_key():
    class ConfigError(ValueError):
        pass

    with pytest.raises(ConfigError, match=r"^a\.b: must not be negative, got -1$"):
        duration_value(-1, "a.b", ConfigError)
    with pytest.raises(ConfigError, match=r"^a\.b: must not be negative, got '-2s'$"):
        duration_value("-2s", "a.b", ConfigError)
    with pytest.raises(ConfigError, match=r"^a\.b: expected a duration like 60s, got True$"):
        duration_value(True, "a.b", ConfigError)
    with pytest.raises(ConfigError, match=r"^q: expected a quantity like 10Gi, got 'inf'$"):
        parse_quantity("inf", "q", ConfigError)
    assert parse_quantity("1.5Ki", "q") == 1536 and parse_quantity(1e9, "q") == 10**9
