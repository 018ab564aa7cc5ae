"""EndpointPickerConfig YAML -> a validated, typed config with every default resolved.

Accepts the reference picker's format unchanged (see reference scheduling.md). Every
mistake is a `ConfigError` whose message starts with the offending key path, e.g.
``plugins[2].parameters.blockSizeTokens: expected an integer, got 'x'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp import units
from epp.framework import PluginError, extension_points, params_from_mapping, plugin_params
from epp.framework.datakeys import ProducerParam
from epp.framework.registry import plugin_class

API_VERSIONS = ("inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1alpha1")
KIND = "EndpointPickerConfig"
FLOW_CONTROL_GATE = "flowControl"
DEFAULT_PICKER = "max-score-picker"
DEFAULT_PROFILE_HANDLER = "single-profile-handler"
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_REQUEST_TTL = 60.0

_DEFAULT_SCORERS = (("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0))


class ConfigError(ValueError):
    """Bad configuration: the message names the key path."""


# --------------------------------------------------------------------------- typed config
@dataclass(slots=True)
class PluginSpec:
    type: str
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # key path for error messages, e.g. "plugins[2]"
    implicit: bool = False  # added by a default rule, not written by the user


@dataclass(slots=True)
class ProfilePluginRef:
    plugin_ref: str
    weight: float = 1.0


@dataclass(slots=True)
class ProfileSpec:
    name: str
    plugins: list[ProfilePluginRef]


@dataclass(slots=True)
class PriorityBandConfig:
    priority: int
    max_bytes: int = DEFAULT_BAND_MAX_BYTES
    max_requests: int = 0  # 0 = unlimited
    fairness_policy: str = "global-strict"  # or "round-robin"


@dataclass(slots=True)
class FlowControlConfig:
    max_bytes: int = 0  # across all bands; 0 = unlimited
    default_request_ttl: float = DEFAULT_REQUEST_TTL  # seconds
    priority_bands: list[PriorityBandConfig] = field(default_factory=list)

    def band(self, priority: int) -> PriorityBandConfig:
        for b in self.priority_bands:
            if b.priority == priority:
                return b
        return PriorityBandConfig(priority=priority)


@dataclass(slots=True)
class EndpointPickerConfig:
    api_version: str
    plugins: list[PluginSpec]  # every instance, implicit ones included
    scheduling_profiles: list[ProfileSpec]
    profile_handler: str  # plugin name
    saturation_detector: str  # plugin name
    feature_gates: frozenset[str] = frozenset()
    flow_control: FlowControlConfig | None = None
    engine_metrics: dict[str, Any] = field(default_factory=dict)  # raw; the data layer validates it
    data: dict[str, Any] = field(default_factory=dict)  # the reference's data-layer section, kept raw

    def plugin(self, name: str) -> PluginSpec:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)


# --------------------------------------------------------------------------- value parsers
def parse_quantity(value: Any, where: str) -> int:
    """Kubernetes quantity ("10Gi", "500M", 1e9, 1024) -> an integer count of bytes."""
    return units.parse_quantity(value, where, ConfigError)


def parse_duration(value: Any, where: str) -> float:
    """Go duration ("60s", "1m30s", "200ms") or a number of seconds -> seconds."""
    return units.duration_value(value, where, ConfigError)


# --------------------------------------------------------------------------- structural checks
def _mapping(value: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    for key in value:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(allowed)})")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --------------------------------------------------------------------------- loading
_TOP_KEYS = ("apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "saturationDetector",
             "flowControl", "engineMetrics", "data")


def load_config(text: str | None) -> EndpointPickerConfig:
    """Parse and validate EndpointPickerConfig YAML; None or blank text gives the defaults."""
    if text is None or not text.strip():
        return _resolve(API_VERSIONS[0], frozenset(), _default_plugins(), None, None, None, {})
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config: not valid YAML: {e}") from None
    if doc is None:
        doc = {}
    doc = _mapping(doc, "", _TOP_KEYS)
    api_version = doc.get("apiVersion", API_VERSIONS[0])
    if api_version not in API_VERSIONS:
        raise ConfigError(f"apiVersion: expected one of {', '.join(API_VERSIONS)}, got {api_version!r}")
    kind = doc.get("kind", KIND)
    if kind != KIND:
        raise ConfigError(f"kind: expected {KIND}, got {kind!r}")
    gates = frozenset(_str(g, f"featureGates[{i}]")
                      for i, g in enumerate(_list(doc.get("featureGates") or [], "featureGates")))
    plugins = _parse_plugins(doc.get("plugins"))
    profiles = _parse_profiles(doc.get("schedulingProfiles"))
    engine_metrics = doc.get("engineMetrics") or {}
    if not isinstance(engine_metrics, Mapping):
        raise ConfigError(f"engineMetrics: expected a mapping of engine -> metric names, got {engine_metrics!r}")
    flow = _parse_flow_control(doc["flowControl"]) if doc.get("flowControl") is not None else None
    saturation = doc.get("saturationDetector")
    data = doc.get("data") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"data: expected a mapping, got {data!r}")
    cfg = _resolve(api_version, gates, plugins, profiles, saturation, flow, dict(engine_metrics))
    cfg.data = dict(data)
    return cfg


def _default_plugins() -> list[PluginSpec]:
    return [PluginSpec(type=t, name=t, implicit=True) for t, _ in _DEFAULT_SCORERS] + [
        PluginSpec(type=DEFAULT_PICKER, name=DEFAULT_PICKER, implicit=True)
    ]


def _parse_plugins(raw: Any) -> list[PluginSpec]:
    specs: list[PluginSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(raw or [], "plugins")):
        where = f"plugins[{i}]"
        item = _mapping(item, where, ("type", "name", "parameters"))
        if "type" not in item:
            raise ConfigError(f"{where}.type: required")
        ptype = _str(item["type"], f"{where}.type")
        name = _str(item["name"], f"{where}.name") if item.get("name") is not None else ptype
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate plugin name {name!r}")
        seen.add(name)
        params = item.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.parameters: expected a mapping, got {params!r}")
        spec = PluginSpec(type=ptype, name=name, parameters=dict(params), where=where)
        _check_plugin(spec)
        specs.append(spec)
    return specs


def _check_plugin(spec: PluginSpec) -> type:
    """Resolve the type and validate the parameters now, so start-up fails early."""
    try:
        cls = plugin_class(spec.type, f"{spec.where}.type")
        plugin_params(cls, spec.type, spec.parameters, f"{spec.where}.parameters")
    except PluginError as e:
        raise ConfigError(str(e)) from None
    return cls


def _parse_profiles(raw: Any) -> list[ProfileSpec] | None:
    if raw is None:
        return None
    profiles: list[ProfileSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(raw, "schedulingProfiles")):
        where = f"schedulingProfiles[{i}]"
        item = _mapping(item, where, ("name", "plugins"))
        name = _str(item.get("name"), f"{where}.name")
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate profile name {name!r}")
        seen.add(name)
        refs = []
        for j, ref in enumerate(_list(item.get("plugins") or [], f"{where}.plugins")):
            rwhere = f"{where}.plugins[{j}]"
            ref = _mapping(ref, rwhere, ("pluginRef", "weight"))
            plugin_ref = _str(ref.get("pluginRef"), f"{rwhere}.pluginRef")
            weight = _number(ref["weight"], f"{rwhere}.weight") if ref.get("weight") is not None else 1.0
            refs.append(ProfilePluginRef(plugin_ref, weight))
        profiles.append(ProfileSpec(name, refs))
    return profiles or None


def _parse_flow_control(raw: Any) -> FlowControlConfig:
    where = "flowControl"
    raw = _mapping(raw, where, ("maxBytes", "defaultRequestTTL", "priorityBands"))
    fc = FlowControlConfig()
    if raw.get("maxBytes") is not None:
        fc.max_bytes = parse_quantity(raw["maxBytes"], f"{where}.maxBytes")
    if raw.get("defaultRequestTTL") is not None:
        fc.default_request_ttl = parse_duration(raw["defaultRequestTTL"], f"{where}.defaultRequestTTL")
    seen: set[int] = set()
    for i, band in enumerate(_list(raw.get("priorityBands") or [], f"{where}.priorityBands")):
        bw = f"{where}.priorityBands[{i}]"
        band = _mapping(band, bw, ("priority", "maxBytes", "maxRequests", "fairnessPolicy"))
        if "priority" not in band:
            raise ConfigError(f"{bw}.priority: required")
        prio = _int(band["priority"], f"{bw}.priority")
        if prio in seen:
            raise ConfigError(f"{bw}.priority: duplicate band priority {prio}")
        seen.add(prio)
        cfg = PriorityBandConfig(priority=prio)
        if band.get("maxBytes") is not None:
            cfg.max_bytes = parse_quantity(band["maxBytes"], f"{bw}.maxBytes")
        if band.get("maxRequests") is not None:
            cfg.max_requests = _int(band["maxRequests"], f"{bw}.maxRequests")
            if cfg.max_requests < 0:
                raise ConfigError(f"{bw}.maxRequests: must not be negative")
        if band.get("fairnessPolicy") is not None:
            policy = _str(band["fairnessPolicy"], f"{bw}.fairnessPolicy")
            if policy not in ("global-strict", "round-robin"):
                raise ConfigError(f"{bw}.fairnessPolicy: expected global-strict or round-robin, got {policy!r}")
            cfg.fairness_policy = policy
        fc.priority_bands.append(cfg)
    return fc


# --------------------------------------------------------------------------- default rules
_KINDS = {"Filter": "filter", "Scorer": "scorer", "Picker": "picker", "ProfileHandler": "handler",
          "SaturationDetector": "saturation"}


def _kind_of(cls: type) -> set[str]:
    return {_KINDS[point] for point in extension_points(cls) if point in _KINDS}


def _consumes(spec: PluginSpec) -> tuple[ProducerParam, ...]:
    return getattr(plugin_class(spec.type), "consumes", ())


def _wire_producers(plugins: list[PluginSpec]) -> None:
    """Point every consumer at the producer it reads (see ProducerParam). A consumer that
    older configs used as the producer (it carries `moved_params`) and whose producer is
    not configured gets an implicit one, placed just before it and carrying the moved
    parameters; consumers with the same moved parameters share one."""
    by_name = {p.name: p for p in plugins}
    given: dict[str, str] = {}  # consumer that used to publish -> the producer publishing for it now
    for spec in list(plugins):
        for ref in _consumes(spec):
            if not ref.moved_params:
                continue
            moved = {k: spec.parameters.pop(k) for k in ref.moved_params if k in spec.parameters}
            named = spec.parameters.get(ref.param)
            target = by_name.get(named or ref.producer_type)
            if target is not None and not target.implicit:
                if moved:
                    raise ConfigError(f"{spec.where}.parameters.{next(iter(moved))}: set it on the producer "
                                      f"{target.name!r}, which {spec.type} reads")
                given[spec.name] = target.name
                continue
            if named and target is None:
                raise ConfigError(f"{spec.where}.parameters.{ref.param}: no plugin named {named!r} in plugins")
            if target is None or target.parameters != moved:
                name, n = ref.producer_type, 1
                while name in by_name:
                    n += 1
                    name = f"{ref.producer_type}-{n}"
                target = PluginSpec(type=ref.producer_type, name=name, parameters=moved, implicit=True,
                                    where=spec.where)
                _check_plugin(target)
                plugins.insert(plugins.index(spec), target)
                by_name[name] = target
            spec.parameters[ref.param] = given[spec.name] = target.name
    for spec in plugins:
        for ref in _consumes(spec):
            old = spec.parameters.pop(ref.legacy_ref, None) if ref.legacy_ref else None
            if old:
                if ref.param in spec.parameters:
                    raise ConfigError(f"{spec.where}.parameters.{ref.legacy_ref}: not allowed together with "
                                      f"{ref.param}")
                spec.parameters[ref.param] = given.get(old, old)
            named = spec.parameters.get(ref.param)
            key = f"{spec.where}.parameters.{ref.legacy_ref if old else ref.param}"  # as the user wrote it
            if named and named not in by_name:
                raise ConfigError(f"{key}: no plugin named {named!r} in plugins")
            if named and "PrepareData" not in extension_points(plugin_class(by_name[named].type)):
                raise ConfigError(f"{key}: {named!r} is not a data producer")


def _resolve(api_version: str, gates: frozenset[str], plugins: list[PluginSpec],
             profiles: list[ProfileSpec] | None, saturation: Any, flow: FlowControlConfig | None,
             engine_metrics: dict[str, Any]) -> EndpointPickerConfig:
    _wire_producers(plugins)
    kinds = {p.name: _kind_of(plugin_class(p.type)) for p in plugins}
    by_name = {p.name: p for p in plugins}

    def add_implicit(ptype: str, params: dict[str, Any] | None = None) -> str:
        name = ptype
        n = 1
        while name in by_name:
            if by_name[name].type == ptype and not params:
                return name  # reuse an existing instance of the default type
            n += 1
            name = f"{ptype}-{n}"
        spec = PluginSpec(type=ptype, name=name, parameters=dict(params or {}), implicit=True,
                          where=f"(default {ptype})")
        _check_plugin(spec)
        plugins.append(spec)
        by_name[name] = spec
        kinds[name] = _kind_of(plugin_class(ptype))
        return name

    if profiles is None:
        pickers = [p.name for p in plugins if "picker" in kinds[p.name]]
        if len(pickers) > 1:
            raise ConfigError("schedulingProfiles: required when more than one picker is configured "
                              f"({', '.join(pickers)})")
        default_weights = dict(_DEFAULT_SCORERS) if all(p.implicit for p in plugins) else {}
        refs = [ProfilePluginRef(p.name, default_weights.get(p.name, 1.0)) for p in plugins
                if kinds[p.name] & {"filter", "scorer", "picker"}]
        profiles = [ProfileSpec("default", refs)]

    for i, prof in enumerate(profiles):
        has_picker = False
        for j, ref in enumerate(prof.plugins):
            if ref.plugin_ref not in by_name:
                raise ConfigError(f"schedulingProfiles[{i}].plugins[{j}].pluginRef: no plugin named "
                                  f"{ref.plugin_ref!r} in plugins")
            k = kinds[ref.plugin_ref]
            # A reference to a hook-only plugin (e.g. a response verifier) is harmless: it
            # takes part through its hooks whether referenced or not.
            if "picker" in k:
                if has_picker:
                    raise ConfigError(f"schedulingProfiles[{i}].plugins[{j}].pluginRef: profile "
                                      f"{prof.name!r} has more than one picker")
                has_picker = True
        if not has_picker:
            prof.plugins.append(ProfilePluginRef(add_implicit(DEFAULT_PICKER)))

    handlers = [p.name for p in plugins if "handler" in kinds[p.name]]
    if len(handlers) > 1:
        raise ConfigError(f"plugins: more than one profile handler ({', '.join(handlers)})")
    if handlers:
        handler = handlers[0]
    elif len(profiles) == 1:
        handler = add_implicit(DEFAULT_PROFILE_HANDLER)
    else:
        raise ConfigError("plugins: several schedulingProfiles need a profile handler plugin "
                          "(e.g. disagg-profile-handler)")

    detector = _resolve_saturation(saturation, plugins, kinds, add_implicit)
    return EndpointPickerConfig(
        api_version=api_version,
        plugins=plugins,
        scheduling_profiles=profiles,
        profile_handler=handler,
        saturation_detector=detector,
        feature_gates=gates,
        flow_control=flow if flow is not None else (FlowControlConfig() if FLOW_CONTROL_GATE in gates else None),
        engine_metrics=engine_metrics,
    )


_LEGACY_DETECTOR_KEYS = ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold", "headroom")


def _resolve_saturation(raw: Any, plugins: list[PluginSpec], kinds: dict[str, set[str]], add_implicit) -> str:
    """`saturationDetector: {pluginRef}`; older configs put the detector's thresholds inline."""
    where = "saturationDetector"
    if raw is None:
        for p in plugins:
            if "saturation" in kinds[p.name]:
                return p.name
        return add_implicit(DEFAULT_SATURATION_DETECTOR)
    raw = _mapping(raw, where, ("pluginRef", *_LEGACY_DETECTOR_KEYS))
    if "pluginRef" in raw:
        if len(raw) > 1:
            extra = next(k for k in raw if k != "pluginRef")
            raise ConfigError(f"{where}.{extra}: not allowed together with pluginRef")
        ref = _str(raw["pluginRef"], f"{where}.pluginRef")
        if ref not in kinds:
            raise ConfigError(f"{where}.pluginRef: no plugin named {ref!r} in plugins")
        if "saturation" not in kinds[ref]:
            raise ConfigError(f"{where}.pluginRef: {ref!r} is not a saturation detector")
        return ref
    params = dict(raw)
    try:
        cls = plugin_class(DEFAULT_SATURATION_DETECTOR)
        params_from_mapping(cls.Params, params, where)
    except PluginError as e:
        raise ConfigError(str(e)) from None
    return add_implicit(DEFAULT_SATURATION_DETECTOR, params)
