"""EndpointPickerConfig YAML -> a validated, typed config with every default resolved.

Accepts the reference picker's format unchanged (llm-d/llm-d-router apix/config/v1alpha1
and its loader, pkg/epp/config/loader), the GIE v1.5 form included. Every mistake is a
`ConfigError` whose message starts with the offending key path, e.g.
``plugins[2].parameters.blockSizeTokens: expected an integer, got 'x'``.

Defaults added as the reference's loader adds them: a name per plugin (its type), one
profile of every filter/scorer/picker when none is given, single-profile-handler for one
profile, max-score-picker for a profile without a picker, utilization-detector as the
saturation detector, the parser list (openai, anthropic, vllmhttp, passthrough) when
requestHandler names none, and metrics-data-source -> core-metrics-extractor as a data
source unless one is configured or `dataLayer.injectDefaults` is false. Deprecated forms
(the inference.networking.x-k8s.io apiVersion, top-level saturationDetector and parser,
the aliased plugin types of registry.ALIASES) are mapped, each logged once per load;
where both the old and the new form are set, the new one wins. What another issue builds
(the flow-control policy types not built yet ...) is refused naming
that feature unless set to the reference's default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from epp.configvalues import (
    ConfigError,
    check_bool,
    check_list,
    check_mapping,
    check_number,
    check_str,
    parse_duration,  # noqa: F401 - part of epp.config's API (tests, callers)
    parse_quantity,  # noqa: F401 - part of epp.config's API (tests, callers)
)
from epp.datalayer.config import DataLayerConfig, parse_data_layer, resolve_data_layer
from epp.flowcontrol.config import (
    FlowControlConfig,
    PriorityBandConfig,  # noqa: F401 - part of epp.config's API
    parse_flow_control,
    resolve_flow_policies,
)
from epp.framework import PluginError, extension_points, params_from_mapping, plugin_params
from epp.framework.datakeys import ProducerParam
from epp.framework.registry import ALIASES, ALPHA, BUILTINS, FUTURE, plugin_class, stability

log = logging.getLogger("epp.config")

API_VERSION = "llm-d.ai/v1alpha1"
DEPRECATED_API_VERSION = "inference.networking.x-k8s.io/v1alpha1"
# llm-d.ai/v1 is not registered by the reference (ebab687) but the llm-d P/D guide uses it.
API_VERSIONS = (API_VERSION, "llm-d.ai/v1", DEPRECATED_API_VERSION)
KIND = "EndpointPickerConfig"
FLOW_CONTROL_GATE = "flowControl"
HA_POPULATE_GATE = "haPopulateNonLeaderDatastore"
# the reference's registered feature gates (cmd/epp/runner) and their defaults
FEATURE_GATES: dict[str, bool] = {FLOW_CONTROL_GATE: False, HA_POPULATE_GATE: True}
DEFAULT_PICKER = "max-score-picker"
DEFAULT_PROFILE_HANDLER = "single-profile-handler"
DEFAULT_SATURATION_DETECTOR = "utilization-detector"
DEFAULT_PARSERS = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")

_DEFAULT_SCORERS = (("queue-scorer", 2.0), ("kv-cache-utilization-scorer", 2.0), ("prefix-cache-scorer", 3.0))


# --------------------------------------------------------------------------- typed config
@dataclass(slots=True)
class PluginSpec:
    type: str
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # key path for error messages, e.g. "plugins[2]"
    implicit: bool = False  # added by a default rule, not written by the user
    alias: str = ""  # the deprecated type name written (registry.ALIASES), mapped to `type`
    alias_refs: dict[str, str] = field(default_factory=dict)  # a deprecated type's cross-references


@dataclass(slots=True)
class ProfilePluginRef:
    plugin_ref: str
    weight: float = 1.0


@dataclass(slots=True)
class ProfileSpec:
    name: str
    plugins: list[ProfilePluginRef]


@dataclass(slots=True)
class EndpointPickerConfig:
    api_version: str
    plugins: list[PluginSpec]  # every instance, implicit ones included
    scheduling_profiles: list[ProfileSpec]
    profile_handler: str  # plugin name
    saturation_detector: str  # plugin name
    feature_gates: frozenset[str] = frozenset()  # the gates the config turns on
    flow_control: FlowControlConfig | None = None
    engine_metrics: dict[str, Any] = field(default_factory=dict)  # raw; the data layer validates it
    data: dict[str, Any] = field(default_factory=dict)  # the GIE v1.5 `data` section, kept raw
    gates: dict[str, bool] = field(default_factory=lambda: dict(FEATURE_GATES))  # every registered gate
    parsers: list[str] = field(default_factory=list)  # requestHandler.parsers: parser plugin names, in order
    data_layer: DataLayerConfig = field(default_factory=DataLayerConfig)

    def plugin(self, name: str) -> PluginSpec:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)


# --------------------------------------------------------------------------- loading
_TOP_KEYS = ("apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "dataLayer", "flowControl",
             "requestHandler", "saturationDetector", "parser", "engineMetrics", "data")
_BOOL_TEXT = {"1": True, "t": True, "true": True, "0": False, "f": False, "false": False}  # Go strconv.ParseBool


@dataclass(slots=True)
class _Raw:
    """The document, each section checked on its own; cross-references are resolved later."""

    api_version: str = API_VERSION
    gates: dict[str, bool] = field(default_factory=dict)  # as written
    plugins: list[PluginSpec] = field(default_factory=list)
    profiles: list[ProfileSpec] | None = None
    saturation: Any = None  # flowControl.saturationDetector, else the top-level one
    saturation_where: str = "saturationDetector"
    flow: FlowControlConfig | None = None
    flow_settings: bool = False  # flowControl sets more than saturationDetector
    parsers: list[tuple[str, str]] | None = None  # (pluginRef, key path)
    data_layer: DataLayerConfig | None = None
    data_layer_refs: list[tuple[str, str, str]] = field(default_factory=list)  # (key path, plugin, role)
    engine_metrics: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, list[PluginSpec]] = field(default_factory=dict)  # deprecated type -> its specs


def load_config(text: str | None) -> EndpointPickerConfig:
    """Parse and validate EndpointPickerConfig YAML; None or blank text gives the defaults."""
    if text is None or not text.strip():
        return _resolve(_Raw(plugins=_default_plugins()))
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config: not valid YAML: {e}") from None
    if doc is None:
        doc = {}
    doc = check_mapping(doc, "", _TOP_KEYS)
    raw = _Raw()
    raw.api_version = doc.get("apiVersion", API_VERSION)
    if raw.api_version not in API_VERSIONS:
        raise ConfigError(f"apiVersion: expected one of {', '.join(API_VERSIONS)}, got {raw.api_version!r}")
    if raw.api_version == DEPRECATED_API_VERSION:
        log.warning("DEPRECATION: apiVersion %s/%s is deprecated; use %s", DEPRECATED_API_VERSION, KIND, API_VERSION)
    kind = doc.get("kind", KIND)
    if kind != KIND:
        raise ConfigError(f"kind: expected {KIND}, got {kind!r}")
    raw.gates = _parse_gates(doc.get("featureGates"))
    raw.plugins = _parse_plugins(doc.get("plugins"), raw.aliases)
    raw.profiles = _parse_profiles(doc.get("schedulingProfiles"))
    engine_metrics = doc.get("engineMetrics") or {}
    if not isinstance(engine_metrics, Mapping):
        raise ConfigError(f"engineMetrics: expected a mapping of engine -> metric names, got {engine_metrics!r}")
    raw.engine_metrics = dict(engine_metrics)
    fc_saturation = None
    if doc.get("flowControl") is not None:
        raw.flow, fc_saturation, raw.flow_settings = parse_flow_control(doc["flowControl"])
    if doc.get("saturationDetector") is not None:
        log.warning("DEPRECATION: top-level saturationDetector is deprecated, use flowControl.saturationDetector "
                    "instead. If both are set, the new field is used.")
    if fc_saturation is not None:
        raw.saturation, raw.saturation_where = fc_saturation, "flowControl.saturationDetector"
    else:
        raw.saturation = doc.get("saturationDetector")
    raw.parsers = _parse_request_handler(doc.get("requestHandler"), doc.get("parser"))
    if doc.get("dataLayer") is not None:
        raw.data_layer, raw.data_layer_refs = parse_data_layer(doc["dataLayer"])
    data = doc.get("data") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"data: expected a mapping, got {data!r}")
    raw.data = dict(data)
    return _resolve(raw)


def _default_plugins() -> list[PluginSpec]:
    return [PluginSpec(type=t, name=t, implicit=True) for t, _ in _DEFAULT_SCORERS] + [
        PluginSpec(type=DEFAULT_PICKER, name=DEFAULT_PICKER, implicit=True)
    ]


def _parse_gates(raw: Any) -> dict[str, bool]:
    """`featureGates: [name, name=bool, ...]` (the reference's list; a bare name turns it on)."""
    gates: dict[str, bool] = {}
    for i, item in enumerate(check_list(raw if raw is not None else [], "featureGates")):
        where = f"featureGates[{i}]"
        name, sep, value = check_str(item, where).partition("=")
        if name not in FEATURE_GATES:
            raise ConfigError(f"{where}: unknown feature gate {name!r} (registered: {', '.join(FEATURE_GATES)})")
        on = True
        if sep:
            text = value.strip().lower()
            if text not in _BOOL_TEXT:
                raise ConfigError(f"{where}: {value!r} is not a valid value for the feature gate {name} "
                                  "(expected true or false)")
            on = _BOOL_TEXT[text]
        if name == HA_POPULATE_GATE and not on:
            raise ConfigError(f"{where}: {HA_POPULATE_GATE}=false is not supported: every replica here keeps its "
                              "datastore populated whether it leads or not")
        gates[name] = on
    return gates


def _parse_plugins(raw: Any, aliases: dict[str, list[PluginSpec]]) -> list[PluginSpec]:
    items = check_list(raw or [], "plugins")
    # A type whose feature another issue builds is the most useful thing to say about a config.
    for i, item in enumerate(items):
        ptype = item.get("type") if isinstance(item, Mapping) else None
        if isinstance(ptype, str) and ptype in FUTURE and ptype not in BUILTINS:
            raise ConfigError(f"plugins[{i}].type: plugin type {ptype!r} needs {FUTURE[ptype]}, not built yet")
    specs: list[PluginSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"plugins[{i}]"
        item = check_mapping(item, where, ("type", "name", "parameters"))
        if "type" not in item:
            raise ConfigError(f"{where}.type: required")
        ptype = check_str(item["type"], f"{where}.type")
        name = check_str(item["name"], f"{where}.name") if item.get("name") is not None else ptype
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate plugin name {name!r}")
        seen.add(name)
        params = item.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.parameters: expected a mapping, got {params!r}")
        spec = PluginSpec(type=ptype, name=name, parameters=dict(params), where=where)
        if ptype in ALIASES and ptype not in BUILTINS:
            _map_alias(spec, aliases)
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


# --------------------------------------------------------------------------- deprecated plugin types
def _map_alias(spec: PluginSpec, aliases: dict[str, list[PluginSpec]]) -> None:
    """Rewrite a deprecated type to its replacement, translating the parameters as the
    reference's deprecated factory reads them; logged once per deprecated type and load."""
    alias = ALIASES[spec.type]
    if spec.type not in aliases:
        log.warning("DEPRECATION: plugin type %r is deprecated since %s (removal planned in %s); use %r",
                    spec.type, alias.deprecated_in, alias.removal_in, alias.replacement)
    aliases.setdefault(spec.type, []).append(spec)
    spec.alias, spec.type = spec.type, alias.replacement
    translate = _ALIAS_PARAMS.get(spec.alias)
    if translate is not None:
        spec.parameters = translate(spec.parameters, f"{spec.where}.parameters")
        spec.alias_refs = spec.parameters.pop("_refs", {})


def _by_label(params: dict[str, Any], where: str) -> dict[str, Any]:
    p = check_mapping(params, where, ("label", "validValues", "allowsNoLabel"))
    if p.get("label") is None:
        raise ConfigError(f"{where}.label: required")
    label = check_str(p["label"], f"{where}.label")
    values = [check_str(v, f"{where}.validValues[{i}]")
              for i, v in enumerate(check_list(p.get("validValues") or [], f"{where}.validValues"))]
    allows = check_bool(p.get("allowsNoLabel", False), f"{where}.allowsNoLabel")
    if not values and not allows:
        raise ConfigError(f"{where}: either validValues must be non-empty or allowsNoLabel must be true")
    if values and allows:
        # "label absent, or one of the values" is no conjunction of selector requirements
        raise ConfigError(f"{where}.allowsNoLabel: true together with validValues has no label-selector-filter "
                          "equivalent; use two profiles or label every endpoint")
    if values:
        return {"matchExpressions": [{"key": label, "operator": "In", "values": values}]}
    return {"matchExpressions": [{"key": label, "operator": "DoesNotExist"}]}


_PD_PARAMS = ("decodeProfile", "prefillProfile", "prefixPluginType", "prefixPluginName", "primaryPort",
              "deciderPluginName", "prefixMatchInfoProducerName")


def _pd_profile_handler(params: dict[str, Any], where: str) -> dict[str, Any]:
    p = check_mapping(params, where, _PD_PARAMS)
    port = p.get("primaryPort") or 0
    if port:
        raise ConfigError(f"{where}.primaryPort: the data-parallel primary port needs disaggregated serving as the "
                          "reference has it today (issue 11)")
    out = {k: check_str(p[k], f"{where}.{k}") for k in ("decodeProfile", "prefillProfile") if p.get(k) is not None}
    # the reference's pd-profile-handler defaults its decider to prefix-based-pd-decider
    out["deciderPluginName"] = check_str(p["deciderPluginName"], f"{where}.deciderPluginName") \
        if p.get("deciderPluginName") else "prefix-based-pd-decider"
    # The prefix plugin names only declare what the decider reads: they must name plugins (checked with
    # the other references, see _check_alias_refs); the decider carries its own producer name.
    out["_refs"] = {k: check_str(p[k], f"{where}.{k}") for k in ("prefixPluginName", "prefixMatchInfoProducerName")
                    if p.get(k)}
    if "prefixPluginName" not in out["_refs"] and p.get("prefixPluginType"):
        out["_refs"]["prefixPluginType"] = check_str(p["prefixPluginType"], f"{where}.prefixPluginType")
    return out


def _headers_handler(params: dict[str, Any], where: str) -> dict[str, Any]:
    p = check_mapping(params, where, ("prefillProfile", "encodeProfile"))
    out = {k: check_str(p[k], f"{where}.{k}") for k in ("prefillProfile",) if p.get(k) is not None}
    out["_refs"] = {"encodeProfile": check_str(p["encodeProfile"], f"{where}.encodeProfile")
                    if p.get("encodeProfile") is not None else "encode"}
    return out


_ALIAS_PARAMS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "by-label": _by_label,
    # by-label-selector takes label-selector-filter's parameters; tokenizer takes token-producer's
    "pd-profile-handler": _pd_profile_handler,
    "prefill-header-handler": _headers_handler,
    "disagg-headers-handler": _headers_handler,
}


def _check_alias_refs(plugins: list[PluginSpec], profiles: list[ProfileSpec] | None) -> None:
    """The cross-references of the deprecated P/D handlers, once every plugin is known.
    A headers handler only wrote the prefill header, which disagg-profile-handler writes
    itself: next to another profile handler it is absorbed (same prefill profile)."""
    names = {p.name for p in plugins}
    profile_names = {p.name for p in profiles or ()}
    for spec in list(plugins):
        refs = spec.alias_refs
        if spec.alias not in ("pd-profile-handler", "prefill-header-handler", "disagg-headers-handler"):
            continue
        if spec.alias == "pd-profile-handler":
            for key, name in refs.items():
                if name not in names:
                    raise ConfigError(f"{spec.where}.parameters.{key}: no plugin named {name!r} in plugins")
            continue
        encode = refs["encodeProfile"]
        if encode in profile_names:
            raise ConfigError(f"{spec.where}.parameters.encodeProfile: the encode stage (profile {encode!r}) needs "
                              "disaggregated serving as the reference has it today (issue 11)")
        others = [p for p in plugins if p is not spec and p.type == "disagg-profile-handler"
                  and p.alias not in ("prefill-header-handler", "disagg-headers-handler")]
        if others:
            mine = spec.parameters.get("prefillProfile", "prefill")
            theirs = others[0].parameters.get("prefillProfile", "prefill")
            if mine != theirs:
                raise ConfigError(f"{spec.where}.parameters.prefillProfile: {mine!r} differs from the prefill "
                                  f"profile {theirs!r} of {others[0].name!r}, which sets the prefill header")
            plugins.remove(spec)


def _parse_profiles(raw: Any) -> list[ProfileSpec] | None:
    if raw is None:
        return None
    profiles: list[ProfileSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(check_list(raw, "schedulingProfiles")):
        where = f"schedulingProfiles[{i}]"
        item = check_mapping(item, where, ("name", "plugins"))
        name = check_str(item.get("name"), f"{where}.name")
        if name in seen:
            raise ConfigError(f"{where}.name: duplicate profile name {name!r}")
        seen.add(name)
        refs = []
        for j, ref in enumerate(check_list(item.get("plugins") or [], f"{where}.plugins")):
            rwhere = f"{where}.plugins[{j}]"
            ref = check_mapping(ref, rwhere, ("pluginRef", "weight"))
            plugin_ref = check_str(ref.get("pluginRef"), f"{rwhere}.pluginRef")
            weight = check_number(ref["weight"], f"{rwhere}.weight") if ref.get("weight") is not None else 1.0
            refs.append(ProfilePluginRef(plugin_ref, weight))
        profiles.append(ProfileSpec(name, refs))
    return profiles or None


def _parse_request_handler(handler: Any, parser: Any) -> list[tuple[str, str]] | None:
    """requestHandler.parsers, else the deprecated top-level parser (one pluginRef)."""
    refs: list[tuple[str, str]] = []
    if handler is not None:
        handler = check_mapping(handler, "requestHandler", ("parsers",))
        for i, item in enumerate(check_list(handler.get("parsers") or [], "requestHandler.parsers")):
            where = f"requestHandler.parsers[{i}]"
            item = check_mapping(item, where, ("pluginRef",))
            refs.append((check_str(item.get("pluginRef"), f"{where}.pluginRef"), f"{where}.pluginRef"))
    if parser is not None:
        log.warning("DEPRECATION: top-level parser is deprecated, use requestHandler.parsers instead. "
                    "If both are set, the new field is used.")
        parser = check_mapping(parser, "parser", ("pluginRef",))
        ref = check_str(parser.get("pluginRef"), "parser.pluginRef")
        if not refs:
            refs = [(ref, "parser.pluginRef")]
    return refs or None


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
    pending = list(plugins)
    while pending:  # an implicit producer may itself consume (inflight-load-producer -> token-producer)
        created: list[PluginSpec] = []
        for spec in pending:
            for ref in _consumes(spec):
                if not ref.moved_params and not ref.required:
                    continue
                if ref.legacy_ref and spec.parameters.get(ref.legacy_ref):
                    continue  # the older parameter names the producer (resolved below)
                moved = {k: spec.parameters.pop(k) for k in ref.moved_params if k in spec.parameters}
                named = spec.parameters.get(ref.param) if ref.param else None
                target = by_name.get(named or ref.producer_type)
                if target is not None and (not target.implicit or not ref.moved_params):
                    if moved:
                        raise ConfigError(f"{spec.where}.parameters.{next(iter(moved))}: set it on the producer "
                                          f"{target.name!r}, which {spec.type} reads")
                    if ref.moved_params:
                        given[spec.name] = target.name
                    continue
                if named and target is None:
                    raise ConfigError(f"{spec.where}.parameters.{ref.param}: no plugin named {named!r} in plugins")
                params = {**dict(ref.moved_defaults), **moved} if moved else {}
                if target is None or target.parameters != params:
                    name, n = ref.producer_type, 1
                    while name in by_name:
                        n += 1
                        name = f"{ref.producer_type}-{n}"
                    target = PluginSpec(type=ref.producer_type, name=name, parameters=params, implicit=True,
                                        where=spec.where)
                    _check_plugin(target)
                    plugins.insert(plugins.index(spec), target)
                    by_name[name] = target
                    created.append(target)
                if ref.moved_params:
                    given[spec.name] = target.name
                if ref.param:
                    spec.parameters[ref.param] = target.name
        pending = created
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
    _order_producers(plugins, by_name)


def _order_producers(plugins: list[PluginSpec], by_name: dict[str, PluginSpec]) -> None:
    """Every producer after the producers it reads (PrepareData runs in this order), as the
    reference's data dependency graph orders them; config order otherwise."""
    order: list[PluginSpec] = []
    state: dict[str, int] = {}  # 1: being placed, 2: placed

    def place(spec: PluginSpec) -> None:
        if state.get(spec.name) == 2:
            return
        if state.get(spec.name) == 1:
            raise ConfigError(f"{spec.where}: data producers read each other in a cycle through {spec.name!r}")
        state[spec.name] = 1
        if "PrepareData" in extension_points(plugin_class(spec.type)):  # filters and scorers run after all
            for ref in _consumes(spec):
                producer = (spec.parameters.get(ref.param) if ref.param else None) or ref.producer_type
                if producer != spec.name and producer in by_name:
                    place(by_name[producer])
        state[spec.name] = 2
        order.append(spec)

    for spec in plugins:
        place(spec)
    plugins[:] = order


def _resolve(raw: _Raw) -> EndpointPickerConfig:
    plugins, profiles = raw.plugins, raw.profiles
    _check_alias_refs(plugins, profiles)
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

    detector = _resolve_saturation(raw.saturation, raw.saturation_where, by_name, kinds, add_implicit)
    parsers = _resolve_parsers(raw.parsers, by_name, add_implicit)
    data_layer = resolve_data_layer(raw.data_layer or DataLayerConfig(), raw.data_layer_refs, by_name,
                                     add_implicit)

    gates = {**FEATURE_GATES, **raw.gates}
    flow = raw.flow
    if gates[FLOW_CONTROL_GATE]:
        flow = flow if flow is not None else FlowControlConfig()
        resolve_flow_policies(flow, by_name, add_implicit)
    elif raw.flow_settings:
        log.warning("the flowControl config section is set but the %s feature gate is off: its settings "
                    "(other than saturationDetector) are ignored", FLOW_CONTROL_GATE)
    return EndpointPickerConfig(
        api_version=raw.api_version,
        plugins=plugins,
        scheduling_profiles=profiles,
        profile_handler=handler,
        saturation_detector=detector,
        feature_gates=frozenset(g for g, on in raw.gates.items() if on),
        flow_control=flow,
        engine_metrics=raw.engine_metrics,
        data=raw.data,
        gates=gates,
        parsers=parsers,
        data_layer=data_layer,
    )


_LEGACY_DETECTOR_KEYS = ("queueDepthThreshold", "kvCacheUtilThreshold", "metricsStalenessThreshold", "headroom")


def _resolve_saturation(raw: Any, where: str, by_name: dict[str, PluginSpec], kinds: dict[str, set[str]],
                        add_implicit: Callable[..., str]) -> str:
    """`{pluginRef}` (empty or absent: utilization-detector, added when no plugin has that
    name); older configs put the detector's thresholds inline at the top level."""
    raw = check_mapping(raw if raw is not None else {}, where, ("pluginRef", *_LEGACY_DETECTOR_KEYS))
    inline = {k: v for k, v in raw.items() if k != "pluginRef"}
    if inline:
        if raw.get("pluginRef") is not None:
            raise ConfigError(f"{where}.{next(iter(inline))}: not allowed together with pluginRef")
        try:
            params_from_mapping(plugin_class(DEFAULT_SATURATION_DETECTOR).Params, dict(inline), where)
        except PluginError as e:
            raise ConfigError(str(e)) from None
        return add_implicit(DEFAULT_SATURATION_DETECTOR, dict(inline))
    ref = check_str(raw["pluginRef"], f"{where}.pluginRef") if raw.get("pluginRef") not in (None, "") else ""
    if not ref or (ref == DEFAULT_SATURATION_DETECTOR and ref not in by_name):
        return add_implicit(DEFAULT_SATURATION_DETECTOR)
    if ref not in by_name:
        raise ConfigError(f"{where}.pluginRef: no plugin named {ref!r} in plugins")
    if "saturation" not in kinds[ref]:
        raise ConfigError(f"{where}.pluginRef: {ref!r} is not a saturation detector")
    return ref


def _known(type_name: str) -> bool:
    try:
        plugin_class(type_name)
    except PluginError:
        return False
    return True


def _resolve_parsers(refs: list[tuple[str, str]] | None, by_name: dict[str, PluginSpec],
                     add_implicit: Callable[..., str]) -> list[str]:
    """The parser chain by plugin name. A pluginRef naming no configured plugin but a
    parser type gets an instance of that type, as the reference's loader does."""
    if refs is None:
        refs = [(t, "(default requestHandler.parsers)") for t in DEFAULT_PARSERS]
    names: list[str] = []
    for ref, where in refs:
        if ref not in by_name:
            if not _known(ref):
                raise ConfigError(f"{where}: no plugin named {ref!r} in plugins")
            add_implicit(ref)
        if "Parser" not in extension_points(plugin_class(by_name[ref].type)):
            raise ConfigError(f"{where}: {ref!r} is not a parser plugin")
        names.append(ref)
    return names


def check_stability(config: EndpointPickerConfig, allow_experimental_plugins: bool) -> None:
    """Alpha plugin types need --allow-experimental-plugins (the reference checks every
    instantiated plugin, implicit ones included, at start-up)."""
    if allow_experimental_plugins:
        return
    for spec in sorted(config.plugins, key=lambda p: p.name):
        if stability(spec.type) == ALPHA:
            raise ConfigError(f"{spec.where or 'plugins'}.type: plugin {spec.name!r} (type: {spec.type!r}) has "
                              "Alpha stability level, but command line flag --allow-experimental-plugins is not set")
