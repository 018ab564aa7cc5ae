"""The picker's metrics: deferred hot-path recording exports exactly what prometheus_client
itself would have, with the reference's names."""

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.options import build_parser, parse_args
from epp.telemetry import (
    DEFAULT_MAX_MODEL_LABELS,
    KNOWN_MODELS_REFRESH,
    MAX_MODEL_LABEL_CHARS,
    OVERFLOW_MODEL_LABEL,
    ModelLabels,
    Telemetry,
)


def samples(registry, name):
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) if f.name == name for s in f.samples
            if not s.name.endswith("_created")}


def test_deferred_histogram_matches_prometheus_client():
    tel = Telemetry()
    ref_registry = CollectorRegistry()
    child = tel.request_duration.get("m", "t", "f", 0)  # feeds the legacy and llm_d_epp families
    bounds = child._bounds  # same buckets as the real metric
    ref = Histogram("inference_objective_request_duration_seconds", "ref", ["model_name", "target_model_name"],
                    buckets=bounds, registry=ref_registry).labels("m", "t")
    rng = random.Random(7)
    values = [rng.uniform(0, 2 * bounds[-2]) for _ in range(500)] + [b for b in bounds if b != math.inf]
    values += [0.0, -1.0, math.inf]
    for i, v in enumerate(values):
        child.observe(v)
        ref.observe(v)
        if i == 250:  # a scrape in the middle must not lose or double anything
            generate_latest(tel.registry)
    name = "inference_objective_request_duration_seconds"
    assert samples(tel.registry, name) == samples(ref_registry, name)


def test_counters_and_gauges_are_exported_on_scrape():
    tel = Telemetry()
    tel.request_total.get("m", "t", "f", 0).inc()
    tel.request_total.get("m", "t", "f", 0).inc(2)
    gauge = tel.running_requests.get("m", "t", "f", 0)
    gauge.inc()
    gauge.inc()
    gauge.dec()
    total = samples(tel.registry, "inference_objective_request")
    assert total[("inference_objective_request_total",
                  (("model_name", "m"), ("priority", "0"), ("target_model_name", "t")))] == 3
    running = samples(tel.registry, "inference_objective_running_requests")
    assert running[("inference_objective_running_requests", (("model_name", "m"),))] == 1
    gauge.dec()
    running = samples(tel.registry, "inference_objective_running_requests")
    assert running[("inference_objective_running_requests", (("model_name", "m"),))] == 0


def test_model_labels_first_come_then_other_and_known_names_pinned():
    known: set[str] = set()
    now = [0.0]
    labels = ModelLabels(limit=2, known=lambda: known, clock=lambda: now[0])
    assert [labels(m) for m in ("a", "b", "c", "a", "")] == ["a", "b", OVERFLOW_MODEL_LABEL, "a", ""]
    known.add("lora-x")
    assert labels("lora-x") == OVERFLOW_MODEL_LABEL  # the known set is re-read at most once a refresh period
    now[0] += KNOWN_MODELS_REFRESH
    assert labels("lora-x") == "lora-x"  # known: its own label, though the first-come budget is spent
    known.clear()
    now[0] += KNOWN_MODELS_REFRESH
    assert labels("lora-x") == "lora-x" and labels("b") == "b"  # a label once given stays (inc/dec pairs meet)
    assert len(labels) == 3


def test_long_model_names_are_never_label_values():
    labels = ModelLabels(limit=5, known=lambda: {"k" * (MAX_MODEL_LABEL_CHARS + 1)})
    assert labels("x" * MAX_MODEL_LABEL_CHARS) == "x" * MAX_MODEL_LABEL_CHARS
    assert labels("y" * 1_000_000) == labels("k" * (MAX_MODEL_LABEL_CHARS + 1)) == OVERFLOW_MODEL_LABEL
    assert len(labels) == 1


def test_known_names_are_bounded_too():
    labels = ModelLabels(limit=3, known=lambda: {f"adapter-{i}" for i in range(100)})
    given = [labels(f"adapter-{i}") for i in range(100)]
    assert len(set(given) - {OVERFLOW_MODEL_LABEL}) == 6  # 3 known, then 3 first come
    assert given[-1] == OVERFLOW_MODEL_LABEL


def test_the_bound_is_a_flag():
    assert parse_args(["--endpoints=10.0.0.1:80"]).metrics_max_model_labels == DEFAULT_MAX_MODEL_LABELS == 32
    assert parse_args(["--endpoints=10.0.0.1:80", "--metrics-max-model-labels=7"]).metrics_max_model_labels == 7
    with pytest.raises(SystemExit):
        parse_args(["--endpoints=10.0.0.1:80", "--metrics-max-model-labels=-1"])
    assert "--metrics-max-model-labels" in build_parser().format_help()


def test_the_server_applies_the_flag_to_its_metrics():
    from epp.server import PickerServer

    picker = PickerServer(parse_args(["--endpoints=10.0.0.1:80", "--metrics-max-model-labels=3"]))
    assert picker.telemetry.model_labels.limit == 3
    assert picker.director.telemetry is picker.telemetry
