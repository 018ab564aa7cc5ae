"""manifests/: every kustomization builds; custom resources validate against the CRDs
shipped beside them; the picker's args parse with its own flag parser; the Role is
exactly what the code needs; probes, security and the dashboard's metric names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.launch import envoy_binary
from epp.discovery.kubernetes import required_rbac
from epp.options import parse_args

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KUBECTL = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml"))
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found: cannot run `kubectl kustomize`")


@cache
def build(directory: str) -> tuple[dict, ...]:
    out = subprocess.run([KUBECTL, "kustomize", str(MANIFESTS / directory)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def raw_documents() -> Iterator[tuple[Path, dict]]:
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "kind" in doc:
                yield path, doc


def find(docs: tuple[dict, ...], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and name in (None, d["metadata"]["name"])]


# --------------------------------------------------------------------------- a small OpenAPI v3 validator
_TYPES = {"object": Mapping, "array": list, "string": str, "boolean": bool}


def validate(value: Any, schema: Mapping, path: str = "") -> list[str]:
    """The subset of OpenAPI v3 that CRD structural schemas use. Unknown fields are
    errors, as with kubectl's (default) strict field validation."""
    errors: list[str] = []
    where = path or "<root>"
    t = schema.get("type")
    if t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: expected integer, got {value!r}"]
    elif t == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [f"{where}: expected number, got {value!r}"]
    elif t in _TYPES and not isinstance(value, _TYPES[t]):
        return [f"{where}: expected {t}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            errors.append(f"{where}: length {len(value)} outside [{schema.get('minLength', 0)}, "
                          f"{schema.get('maxLength', '-')}]")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            errors.append(f"{where}: {len(value)} items outside [{schema.get('minItems', 0)}, "
                          f"{schema.get('maxItems', '-')}]")
        keys = schema.get("x-kubernetes-list-map-keys")
        if keys:
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, Mapping)]
            if len(seen) != len(set(seen)):
                errors.append(f"{where}: duplicate entries for list-map keys {keys}")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, Mapping):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        n = len(value)
        if n < schema.get("minProperties", 0) or n > schema.get("maxProperties", 1 << 30):
            errors.append(f"{where}: {n} properties outside [{schema.get('minProperties', 0)}, "
                          f"{schema.get('maxProperties', '-')}]")
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: required field {key!r} missing")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if key in props:
                errors += validate(item, props[key], sub)
            elif isinstance(extra, Mapping):
                errors += validate(item, extra, sub)
            elif extra is False or (props and not schema.get("x-kubernetes-preserve-unknown-fields")):
                errors.append(f"{where}: unknown field {key!r}")
    return errors


def crd_schemas() -> dict[tuple[str, str], Mapping]:
    """(apiVersion, kind) -> openAPIV3Schema, from manifests/crds."""
    schemas = {}
    for path in sorted((MANIFESTS / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        for version in spec["versions"]:
            schemas[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def custom_resources() -> list[tuple[str, dict]]:
    schemas = crd_schemas()
    found = [(str(p.relative_to(MANIFESTS)), d) for p, d in raw_documents() if (d["apiVersion"], d["kind"]) in schemas]
    return found


# --------------------------------------------------------------------------- tests
@needs_kubectl
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomization_builds(directory):
    docs = build(directory)
    assert docs, f"{directory} builds to nothing"
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d


def test_expected_overlays_exist():
    for d in ("crds", "base", "simulator", "monitoring", "examples/envoy-gateway", "examples/istio",
              "examples/kgateway", "overlays/standalone", "overlays/ha"):
        assert d in KUSTOMIZATIONS


def test_crds_are_structural_and_cover_the_three_kinds():
    schemas = crd_schemas()
    assert set(schemas) == {("inference.networking.k8s.io/v1", "InferencePool"),
                            ("llm-d.ai/v1alpha2", "InferenceObjective"),
                            ("llm-d.ai/v1alpha2", "InferenceModelRewrite"),
                            ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"),
                            ("inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite")}

    def walk(node: Mapping, path: str) -> Iterator[str]:
        if path.endswith(".metadata"):
            return
        if "type" not in node:
            yield f"{path}: no type"
        if "properties" in node and "additionalProperties" in node:
            yield f"{path}: properties and additionalProperties are mutually exclusive in a CRD"
        for key, sub in (node.get("properties") or {}).items():
            yield from walk(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), Mapping):
                yield from walk(node[key], f"{path}.{key}")

    problems = [p for (gv, kind), s in schemas.items() for p in walk(s, kind)]
    assert not problems, problems


def test_every_custom_resource_validates_against_its_crd():
    schemas = crd_schemas()
    found = custom_resources()
    kinds = {d["kind"] for _, d in found}
    assert kinds == {"InferencePool", "InferenceObjective", "InferenceModelRewrite"}, kinds
    for where, doc in found:
        errors = validate(doc, schemas[(doc["apiVersion"], doc["kind"])])
        assert not errors, f"{where} {doc['kind']}/{doc['metadata']['name']}: {errors}"


@pytest.mark.parametrize("mutate,expect", [
    (lambda p: p["spec"].update(targetPorts=[{"number": 8000 + i} for i in range(9)]), "9 items outside"),
    (lambda p: p["spec"].update(targetPorts=[{"number": 8000}, {"number": 8000}]), "duplicate entries"),
    (lambda p: p["spec"]["targetPorts"][0].update(number=70000), "maximum"),
    (lambda p: p["spec"]["selector"].pop("matchLabels"), "'matchLabels' missing"),
    (lambda p: p["spec"]["selector"].update(matchLabels={}), "0 properties outside"),
    (lambda p: p["spec"]["endpointPickerRef"].update(failureMode="Maybe"), "not in"),
    (lambda p: p["spec"].update(targetPortNumber=8000), "unknown field 'targetPortNumber'"),
    (lambda p: p["spec"]["selector"]["matchLabels"].update(app="-bad-"), "does not match"),
])
def test_validator_rejects_bad_pools(mutate, expect):
    schemas = crd_schemas()
    pool = yaml.safe_load((MANIFESTS / "examples/pool/inferencepool.yaml").read_text())
    mutate(pool)
    errors = validate(pool, schemas[("inference.networking.k8s.io/v1", "InferencePool")])
    assert any(expect in e for e in errors), errors


def test_validator_rejects_bad_rewrites():
    schemas = crd_schemas()
    rw = yaml.safe_load((MANIFESTS / "examples/pool/inferencemodelrewrite.yaml").read_text())
    rw["spec"]["rules"][0]["targets"][0]["weight"] = 0
    rw["spec"]["rules"][0]["matches"][0]["model"]["type"] = "Prefix"
    errors = validate(rw, schemas[("inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite")])
    assert len(errors) == 2 and any("minimum" in e for e in errors) and any("Prefix" in e for e in errors)


def picker_deployments() -> list[tuple[str, dict]]:
    return [(d, dep) for d in KUSTOMIZATIONS for dep in find(build(d), "Deployment", "epp")]


def picker_container(deployment: dict) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "epp")


@needs_kubectl
def test_picker_args_parse_and_the_role_is_exactly_what_the_code_needs():
    deployments = picker_deployments()
    assert {d for d, _ in deployments} >= {"base", "overlays/ha", "overlays/standalone", "examples/istio"}
    for directory, dep in deployments:
        options = parse_args(picker_container(dep)["args"])
        (role,) = find(build(directory), "Role", "epp")
        granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
                   for v in rule["verbs"]}
        needed = {(rule.group, rule.resource, v) for rule in required_rbac(options) for v in rule.verbs}
        assert granted == needed, f"{directory}: Role grants {granted ^ needed} beyond/short of what the code uses"
        (binding,) = find(build(directory), "RoleBinding", "epp")
        assert binding["roleRef"]["name"] == "epp" and binding["subjects"][0]["name"] == \
            dep["spec"]["template"]["spec"]["serviceAccountName"]
    modes = {d: parse_args(picker_container(dep)["args"]) for d, dep in deployments}
    assert modes["overlays/ha"].ha_enable_leader_election and modes["overlays/standalone"].endpoint_selector
    assert modes["base"].pool_name == "vllm-sim" and modes["base"].secure_serving


@needs_kubectl
def test_picker_pod_probes_security_and_service():
    docs = build("base")
    (dep,) = find(docs, "Deployment", "epp")
    pod = dep["spec"]["template"]["spec"]
    c = picker_container(dep)
    assert c["livenessProbe"]["grpc"] == {"port": 9003, "service": "liveness"}
    assert c["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert {e["name"] for e in c["env"]} >= {"NAMESPACE"}
    (svc,) = find(docs, "Service", "epp")
    assert {p["port"] for p in svc["spec"]["ports"]} == {9002, 9003, 9090}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (cm,) = find(docs, "ConfigMap", "epp-config")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert parse_args(c["args"]).config_file == f"{mount['mountPath']}/config.yaml" and "config.yaml" in cm["data"]


@needs_kubectl
def test_the_shipped_endpoint_picker_config_loads():
    config = pytest.importorskip("epp.config")
    (cm,) = find(build("base"), "ConfigMap", "epp-config")
    loaded = config.load_config(cm["data"]["config.yaml"])
    assert loaded is not None


@needs_kubectl
def test_simulator_deployment_matches_the_pool_and_its_flags_parse():
    cli = pytest.importorskip("simulator.cli")
    docs = build("examples/envoy-gateway")
    (sim,) = find(docs, "Deployment", "vllm-sim")
    (pool,) = find(docs, "InferencePool")
    labels = sim["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = sim["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["epp", "sim"]
    args = cli.build_parser().parse_args(container["args"])
    assert args.port == pool["spec"]["targetPorts"][0]["number"] == container["ports"][0]["containerPort"]
    (picker,) = find(docs, "Deployment", "epp")
    assert parse_args(picker_container(picker)["args"]).pool_name == pool["metadata"]["name"]
    assert pool["spec"]["endpointPickerRef"]["name"] == "epp"


@needs_kubectl
def test_gateway_examples_route_to_the_pool():
    for gw in ("envoy-gateway", "istio", "kgateway"):
        docs = build(f"examples/{gw}")
        (route,) = find(docs, "HTTPRoute")
        refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
        assert refs == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "vllm-sim"}]
        (gateway,) = find(docs, "Gateway")
        assert route["spec"]["parentRefs"][0]["name"] == gateway["metadata"]["name"]
    (dr,) = find(build("examples/istio"), "DestinationRule")
    assert dr["spec"]["host"] == "epp" and dr["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"


@needs_kubectl
def test_standalone_envoy_sidecar_config_is_valid_for_the_real_envoy(tmp_path):
    try:
        envoy = envoy_binary()
    except FileNotFoundError:
        pytest.skip("Envoy binary not found")
    docs = build("overlays/standalone")
    (dep,) = find(docs, "Deployment", "epp")
    containers = {c["name"]: c for c in dep["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"epp", "envoy"} and containers["envoy"]["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    (cm,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("epp-envoy")]
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "envoy-config")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]  # hashed name wired through
    path = tmp_path / "envoy.yaml"
    path.write_text(cm["data"]["envoy.yaml"])
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--base-id", "7"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    cfg = yaml.safe_load(cm["data"]["envoy.yaml"])
    epp = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "epp")
    port = epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    options = parse_args(containers["epp"]["args"])
    assert port["port_value"] == options.grpc_port and options.secure_serving and "transport_socket" in epp


def picker_metric_names() -> set[str]:
    """Every series name the assembled picker exposes on /metrics (from its TYPE lines)."""
    from prometheus_client import generate_latest

    server = pytest.importorskip("epp.server")
    page = generate_latest(server.PickerServer(parse_args(["--endpoints=127.0.0.1:1"])).telemetry.registry).decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", page, re.M):
        names |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else {name}
    return names


def test_dashboard_uses_only_the_pickers_metric_names():
    dash = json.loads((MANIFESTS / "monitoring/dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:inference|llm_d)_[a-z0-9_]+", e)}
    known = picker_metric_names()
    assert used and used <= known, used - known
    assert len(known) > 40 and {"inference_objective_request_total", "inference_pool_ready_pods",
            "llm_d_epp_request_total", "llm_d_epp_scheduler_e2e_duration_seconds_bucket"} <= used
    (sm,) = [d for _, d in raw_documents() if d["kind"] == "ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def test_dockerfile_is_multi_stage_pinned_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), image
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    assert 'ENTRYPOINT ["epp", "serve"]' in text
