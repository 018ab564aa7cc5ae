"""Endpoints without Kubernetes: `--endpoints ip:port,...` or a watched YAML file.

The file (`--endpoints-file`) holds endpoints, model rewrites and objectives:

    endpoints:
    - name: vllm-0
      address: 10.0.0.1
      port: 8000
      labels: {inference.networking.k8s.io/engine-type: vllm, llm-d.ai/role: decode}
    modelRewrites:        # InferenceModelRewrite spec shape (name + rules)
    - name: rw1
      rules:
      - matches: [{model: {type: Exact, value: food-review}}]
        targets: [{modelRewrite: food-review-v2, weight: 90}, {modelRewrite: food-review-v1, weight: 10}]
    objectives:           # InferenceObjective (name, priority)
    - {name: batch, priority: -1}

Edits apply live; a bad edit is logged with the offending key and the previous state
is kept. Editors that save by rename-replace are seen too: the watcher compares the
path's inode as well as its mtime and size.

The reference's no-Kubernetes mode reads the same shape: its `file-discovery` plugin
(`dataLayer.discovery.pluginRef`, parameters `path` and `watchFile`) names a YAML or JSON
file `{endpoints: [{name, namespace, address, port, labels}]}` with ports written as
strings ("8000"), capped at 1 MiB. epp.discovery.file.FileDiscovery is that plugin, run
by this same loader and watcher (watching only with `watchFile: true`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from epp.datalayer.datastore import (
    Datastore,
    EndpointSpec,
    ModelRewrite,
    Objective,
    RewriteRule,
    RewriteTarget,
)
from epp.netaddr import parse_hostport, parse_ip
from epp.yamlcheck import expect_int, expect_list

log = logging.getLogger("epp.discovery.static")

MAX_REWRITE_WEIGHT = 1_000_000
MAX_FILE_BYTES = 1 << 20  # an endpoints file (the reference's file-discovery cap)


@dataclass(frozen=True, slots=True)
class StaticPool:
    """Everything an endpoints file describes."""

    endpoints: tuple[EndpointSpec, ...] = ()
    rewrites: tuple[ModelRewrite, ...] = ()
    objectives: tuple[Objective, ...] = ()


MAX_NAME = 253  # an endpoint name, as a Kubernetes object name (names travel in API responses and metrics)


# ---------------------------------------------------------------------------- --endpoints
def endpoint_name(address: str, port: int) -> str:
    return f"ep-{address}-{port}"


def endpoints_from_flag(items: Iterable[str]) -> list[EndpointSpec]:
    specs: list[EndpointSpec] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(items):
        address, port = parse_hostport(item, f"--endpoints[{i}]")
        if (address, port) in seen:
            raise ValueError(f"--endpoints[{i}]: duplicate endpoint {item!r}")
        seen.add((address, port))
        specs.append(EndpointSpec(name=endpoint_name(address, port), address=address, port=port))
    return specs


# ---------------------------------------------------------------------------- the file
def _mapping(value: Any, where: str, keys: Sequence[str], required: Sequence[str] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {value!r}")
    for key in value:
        if key not in keys:
            raise ValueError(f"{where}.{key}: unknown key (known: {', '.join(keys)})")
    for key in required:
        if key not in value:
            raise ValueError(f"{where}.{key}: required")
    return value


def _str(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if not empty and not value:
        raise ValueError(f"{where}: must not be empty")
    return value


def _endpoint(raw: Any, where: str) -> EndpointSpec:
    m = _mapping(raw, where, ("name", "address", "port", "labels", "namespace"), ("address", "port"))
    address_text = _str(m["address"], f"{where}.address")
    address = parse_ip(address_text.strip("[]"), f"{where}.address", address_text)
    raw_port = m["port"]
    if isinstance(raw_port, str) and raw_port.strip().isdigit() and len(raw_port.strip()) <= 5:
        raw_port = int(raw_port)  # the reference's file format writes ports as strings
    port = expect_int(raw_port, f"{where}.port")
    if not 0 < port < 65536:
        raise ValueError(f"{where}.port: {port} is out of range 1-65535")
    labels: dict[str, str] = {}
    raw_labels = m.get("labels") or {}
    if not isinstance(raw_labels, Mapping):
        raise ValueError(f"{where}.labels: expected a mapping, got {raw_labels!r}")
    for key, value in raw_labels.items():
        labels[_str(key, f"{where}.labels")] = _str(value, f"{where}.labels.{key}", empty=True)
    name = _str(m["name"], f"{where}.name") if "name" in m else endpoint_name(address, port)
    if len(name) > MAX_NAME:
        raise ValueError(f"{where}.name: longer than {MAX_NAME} characters")
    namespace = _str(m.get("namespace", "default"), f"{where}.namespace")
    return EndpointSpec(name=name, address=address, port=port, labels=labels, namespace=namespace)


def _rewrite(raw: Any, where: str) -> ModelRewrite:
    m = _mapping(raw, where, ("name", "rules"), ("name",))
    rules = []
    for i, rule_raw in enumerate(expect_list(m.get("rules"), f"{where}.rules")):
        rw = f"{where}.rules[{i}]"
        rule = _mapping(rule_raw, rw, ("matches", "targets"))
        matches = []
        for j, match_raw in enumerate(expect_list(rule.get("matches"), f"{rw}.matches")):
            mw = f"{rw}.matches[{j}]"
            model = _mapping(_mapping(match_raw, mw, ("model",), ("model",))["model"], f"{mw}.model",
                             ("type", "value"), ("value",))
            kind = model.get("type", "Exact")
            if kind != "Exact":
                raise ValueError(f"{mw}.model.type: only Exact is supported, got {kind!r}")
            matches.append(_str(model["value"], f"{mw}.model.value"))
        targets = []
        for j, target_raw in enumerate(expect_list(rule.get("targets"), f"{rw}.targets")):
            tw = f"{rw}.targets[{j}]"
            target = _mapping(target_raw, tw, ("modelRewrite", "weight"), ("modelRewrite",))
            weight = expect_int(target.get("weight", 1), f"{tw}.weight")
            if not 1 <= weight <= MAX_REWRITE_WEIGHT:
                raise ValueError(f"{tw}.weight: {weight} is out of range 1-{MAX_REWRITE_WEIGHT}")
            targets.append(RewriteTarget(_str(target["modelRewrite"], f"{tw}.modelRewrite"), weight))
        if not targets:
            raise ValueError(f"{rw}.targets: at least one target is required")
        rules.append(RewriteRule(matches=tuple(matches), targets=tuple(targets)))
    return ModelRewrite(name=_str(m["name"], f"{where}.name"), rules=tuple(rules))


def _objective(raw: Any, where: str) -> Objective:
    m = _mapping(raw, where, ("name", "priority"), ("name",))
    return Objective(name=_str(m["name"], f"{where}.name"),
                     priority=expect_int(m.get("priority", 0), f"{where}.priority"))


def _unique(items: Sequence[Any], what: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.name in seen:
            raise ValueError(f"{what}[{i}].name: duplicate name {item.name!r}")
        seen.add(item.name)


def parse_endpoints_file(text: str) -> StaticPool:
    """YAML text -> StaticPool; ValueError naming the offending key."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from None
    if doc is None:
        return StaticPool()
    top = _mapping(doc, "(top level)", ("endpoints", "modelRewrites", "objectives"))
    endpoints = [_endpoint(e, f"endpoints[{i}]")
                 for i, e in enumerate(expect_list(top.get("endpoints"), "endpoints"))]
    _unique(endpoints, "endpoints")
    seen: dict[str, int] = {}
    for i, ep in enumerate(endpoints):
        if (prev := seen.setdefault(f"{ep.address}:{ep.port}", i)) != i:
            raise ValueError(f"endpoints[{i}]: same address and port as endpoints[{prev}]")
    rewrites = [_rewrite(r, f"modelRewrites[{i}]")
                for i, r in enumerate(expect_list(top.get("modelRewrites"), "modelRewrites"))]
    _unique(rewrites, "modelRewrites")
    objectives = [_objective(o, f"objectives[{i}]") for i, o in enumerate(expect_list(top.get("objectives"), "objectives"))]
    _unique(objectives, "objectives")
    return StaticPool(tuple(endpoints), tuple(rewrites), tuple(objectives))


def load_endpoints_file(path: str) -> StaticPool:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: endpoints file exceeds {MAX_FILE_BYTES} bytes (1 MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    try:
        return parse_endpoints_file(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------- discovery
def _file_id(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size


class StaticDiscovery:
    """Fills the datastore from flags or a file; watches the file for edits."""

    def __init__(self, datastore: Datastore, *, endpoints: Sequence[str] = (), file: str = "",
                 poll_interval: float = 0.25, watch: bool = True) -> None:
        if endpoints and file:
            raise ValueError("--endpoints and --endpoints-file are mutually exclusive")
        self.datastore = datastore
        self.endpoints = list(endpoints)
        self.file = file
        self.poll_interval = poll_interval
        self.watch = watch  # re-read the file on edits
        self.reloads = 0  # successful applies of the file (start-up included)
        self.last_error = ""  # the last rejected edit, "" once a good one applies
        self._file_id: tuple[int, int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load synchronously (ValueError naming the key if the source is bad), mark
        the datastore synced, then watch the file in the background."""
        if self.file:
            self._file_id = _file_id(self.file)
            self._apply(load_endpoints_file(self.file))
            if self.watch:
                self._task = asyncio.get_running_loop().create_task(self._watch(), name="watch endpoints file")
        else:
            self.datastore.replace_all(endpoints_from_flag(self.endpoints))
        self.datastore.synced = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _apply(self, pool: StaticPool) -> None:
        self.datastore.replace_all(pool.endpoints)
        self.datastore.replace_rewrites(pool.rewrites)
        self.datastore.replace_objectives(pool.objectives)
        self.reloads += 1
        self.last_error = ""

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            current = _file_id(self.file)
            if current == self._file_id:
                continue
            self._file_id = current
            if current is None:
                self._reject(f"{self.file}: file is gone")
                continue
            try:
                pool = load_endpoints_file(self.file)
            except ValueError as e:
                self._reject(str(e))
                continue
            self._apply(pool)
            log.info("%s reloaded: %d endpoints, %d model rewrites, %d objectives", self.file,
                     len(pool.endpoints), len(pool.rewrites), len(pool.objectives))

    def _reject(self, message: str) -> None:
        self.last_error = message
        log.error("endpoints file edit rejected, keeping the previous state: %s", message)

