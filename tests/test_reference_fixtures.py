"""The checked-in facts about the reference picker (tests/fixtures/reference/) stay well-formed
and consistent with each other. These check the fixtures, not the picker: the tests that run
`epp serve` on them come with the implementation of issue 10."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REF = Path(__file__).parent / "fixtures" / "reference"
CONFIGS = sorted((REF / "configs").glob("*.yaml"))
FLAG_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


def rows(name: str, columns: int) -> list[list[str]]:
    """Tab-separated data lines of a fixture; '#' lines are comments."""
    out = []
    for n, line in enumerate((REF / name).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        assert len(cells) == columns, f"{name}:{n}: {len(cells)} columns, expected {columns}: {line!r}"
        assert all(c.strip() for c in cells), f"{name}:{n}: empty cell"
        out.append(cells)
    assert out, f"{name}: no data lines"
    return out


def unique_first_column(name: str, table: list[list[str]]) -> set[str]:
    names = [r[0] for r in table]
    dups = sorted({n for n in names if names.count(n) > 1})
    assert not dups, f"{name}: duplicate names {dups}"
    return set(names)


def flag_names(name: str) -> set[str]:
    table = rows(name, 4)
    for r in table:
        assert FLAG_NAME.match(r[0]), f"{name}: bad flag name {r[0]!r}"
    return unique_first_column(name, table)


def plugin_types() -> dict[str, list[str]]:
    table = rows("plugins.txt", 6)
    unique_first_column("plugins.txt", table)
    return {r[0]: r for r in table}


def test_the_expected_config_fixtures_are_present():
    names = {p.name for p in CONFIGS}
    for required in ("llm-d-router-chart-gateway.yaml", "llm-d-router-chart-standalone.yaml",
                     "gie-v1.5-chart-default.yaml", "llm-d-router-chart-payload-agnostic.yaml",
                     "llm-d-optimized-baseline.yaml"):
        assert required in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_fixture_is_an_endpoint_picker_config_with_its_source(path: Path):
    text = path.read_text()
    assert text.startswith("# Source: "), "each fixture starts by naming where it comes from"
    assert "Flags" in text.split("apiVersion:")[0], "and the flags that deployment passes"
    doc = yaml.safe_load(text)
    assert doc["apiVersion"] in ("llm-d.ai/v1alpha1", "llm-d.ai/v1", "inference.networking.x-k8s.io/v1alpha1")
    assert doc["kind"] == "EndpointPickerConfig"
    names = []
    for p in doc["plugins"]:
        assert isinstance(p["type"], str) and p["type"]
        names.append(p.get("name") or p["type"])
    assert len(names) == len(set(names)), f"duplicate plugin names {names}"
    for profile in doc.get("schedulingProfiles") or []:
        for ref in profile["plugins"]:
            assert ref["pluginRef"] in names, f"profile {profile['name']}: dangling pluginRef {ref['pluginRef']}"
    for source in (doc.get("dataLayer") or {}).get("sources") or []:
        assert source["pluginRef"] in names
        assert all(e["pluginRef"] in names for e in source.get("extractors") or [])
    for parser in (doc.get("requestHandler") or {}).get("parsers") or []:
        assert parser["pluginRef"] in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_fixture_names_only_plugin_types_the_reference_registers(path: Path):
    known = plugin_types()
    used = {p["type"] for p in yaml.safe_load(path.read_text())["plugins"]}
    assert used <= set(known), f"not in plugins.txt: {sorted(used - set(known))}"


def test_flag_lists_are_four_columns_without_duplicates():
    current, v15 = flag_names("flags.txt"), flag_names("flags-v1.5.txt")
    # anchors: flags the charts of each generation are known to emit
    assert {"drain-timeout", "enable-cert-reload", "tls-min-version", "metrics-endpoint-auth",
            "allow-experimental-plugins", "v", "zap-encoder", "grpc-health-port"} <= current
    assert {"model-server-metrics-path", "metrics-endpoint-auth", "v", "zap-encoder"} <= v15


def test_every_flag_a_chart_renders_is_a_flag_of_its_generation():
    current, v15 = flag_names("flags.txt"), flag_names("flags-v1.5.txt")
    table = rows("chart-args.txt", 4)
    for chart, variant, _, argv_json in table:
        argv = json.loads(argv_json)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        known = v15 if chart.startswith("gie-v1.5") else current
        for arg in argv:
            if arg.startswith("-"):
                name = arg.lstrip("-").split("=", 1)[0]
                assert name in known, f"{chart}/{variant}: {arg} is not in the flag list of its generation"


def test_metric_families_are_well_formed():
    table = rows("metrics.txt", 7)
    names = unique_first_column("metrics.txt", table)
    for name, mtype, labels, buckets, _, scope, _ in table:
        assert mtype in ("counter", "gauge", "histogram"), name
        assert re.match(r"^[a-z_][a-z0-9_]*$", name), name
        assert labels == "-" or all(re.match(r"^[a-z_]+$", lab) for lab in labels.split(",")), name
        assert scope.startswith(("core", "plugin:")), name
        if mtype == "histogram" and not buckets.startswith("prometheus default"):
            bounds = [float(b) for b in buckets.split(",")]
            assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), f"{name}: buckets not ascending"
        elif mtype != "histogram":
            assert buckets == "-", name
    # the current families and the legacy ones autoscalers read are both listed
    assert {"llm_d_epp_request_total", "llm_d_epp_flow_control_pool_saturation",
            "inference_objective_request_total", "inference_pool_average_kv_cache_utilization",
            "inference_extension_scheduler_e2e_duration_seconds"} <= names


def test_headers_are_well_formed():
    table = rows("headers.txt", 5)
    names = unique_first_column("headers.txt", table)
    assert {"x-llm-d-inference-objective", "x-gateway-inference-objective", "x-llm-d-request-dropped-reason",
            "x-gateway-destination-endpoint", "x-session-id"} <= names
    for name, direction, *_ in table:
        assert re.match(r"^(req-in|req-out|resp-out|meta-in|meta-out)", direction), f"{name}: {direction}"


def test_plugin_table_is_well_formed_and_aliases_point_at_registered_types():
    known = plugin_types()
    assert {"metrics-data-source", "core-metrics-extractor", "approx-prefix-cache-producer",
            "inflight-load-producer", "passthrough-parser", "file-discovery"} <= set(known)
    for ptype, (_, stability, status, eps, _, path) in known.items():
        assert stability in ("Alpha", "Beta"), ptype
        assert path.startswith("pkg/"), ptype
        assert eps, ptype
        target = re.search(r"-> ([a-z0-9-]+)", status)
        if status.startswith("deprecated"):
            assert target and target.group(1) in known, f"{ptype}: alias target not registered"
