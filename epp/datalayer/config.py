"""The EndpointPickerConfig's dataLayer section: its typed form (the polled sources with their
extractors, the endpoint-discovery plugin), its parsing, and the check that every plugin
it names has that role, with the reference's injected default source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from epp.configvalues import ConfigError, check_bool, check_list, check_mapping, check_str, parse_duration
from epp.framework.registry import plugin_class

if TYPE_CHECKING:
    from epp.config import PluginSpec

METRICS_SOURCE = "metrics-data-source"
METRICS_EXTRACTOR = "core-metrics-extractor"


@dataclass(slots=True)
class DataSourceSpec:
    plugin_ref: str  # a data source plugin (e.g. metrics-data-source)
    extractors: list[str] = field(default_factory=list)  # extractor plugin names, in order
    implicit: bool = False


@dataclass(slots=True)
class DataLayerConfig:
    """The reference's `dataLayer`: polled sources with their extractors, and the endpoint
    discovery plugin (instead of the pool flags). Plugin names, resolved against plugins."""

    inject_defaults: bool = True
    sources: list[DataSourceSpec] = field(default_factory=list)
    discovery: str = ""  # an endpoint-discovery plugin name ("" = the pool/endpoint flags)
    cross_replica_sync_interval: float | None = None  # seconds; only read with a syncer


def parse_data_layer(raw: Any) -> tuple[DataLayerConfig, list[tuple[str, str, str]]]:
    where = "dataLayer"
    raw = check_mapping(raw, where, ("injectDefaults", "sources", "discovery", "peerDiscovery",
                                "crossReplicaSyncerPluginRef", "crossReplicaSyncInterval"))
    dl = DataLayerConfig()
    refs: list[tuple[str, str, str]] = []
    if raw.get("injectDefaults") is not None:
        dl.inject_defaults = check_bool(raw["injectDefaults"], f"{where}.injectDefaults")
    for i, src in enumerate(check_list(raw.get("sources") or [], f"{where}.sources")):
        sw = f"{where}.sources[{i}]"
        src = check_mapping(src, sw, ("pluginRef", "extractors"))
        ref = check_str(src.get("pluginRef"), f"{sw}.pluginRef")
        refs.append((f"{sw}.pluginRef", ref, "DataSource"))
        extractors = []
        for j, ext in enumerate(check_list(src.get("extractors") or [], f"{sw}.extractors")):
            ew = f"{sw}.extractors[{j}]"
            name = check_str(check_mapping(ext, ew, ("pluginRef",)).get("pluginRef"), f"{ew}.pluginRef")
            refs.append((f"{ew}.pluginRef", name, "Extractor"))
            extractors.append(name)
        dl.sources.append(DataSourceSpec(ref, extractors))
    if raw.get("discovery") is not None:
        dw = f"{where}.discovery"
        dl.discovery = check_str(check_mapping(raw["discovery"], dw, ("pluginRef",)).get("pluginRef"),
                                 f"{dw}.pluginRef")
        refs.append((f"{dw}.pluginRef", dl.discovery, "EndpointDiscovery"))
    for key in ("peerDiscovery", "crossReplicaSyncerPluginRef"):
        if raw.get(key):
            raise ConfigError(f"{where}.{key}: sharing data-layer state across replicas is not supported here "
                              "(no plugin type provides it)")
    if raw.get("crossReplicaSyncInterval") is not None:
        dl.cross_replica_sync_interval = parse_duration(raw["crossReplicaSyncInterval"],
                                                        f"{where}.crossReplicaSyncInterval")
    return dl, refs


_DATA_ROLES: dict[str, Callable[[type], bool]] = {
    "DataSource": lambda cls: isinstance(getattr(cls, "output_kind", None), str),
    "Extractor": lambda cls: isinstance(getattr(cls, "input_kind", None), str),
    "EndpointDiscovery": lambda cls: callable(getattr(cls, "discovery", None)),
}
_DATA_ROLE_NAMES = {"DataSource": "data source", "Extractor": "data extractor",
                    "EndpointDiscovery": "endpoint discovery plugin"}


def resolve_data_layer(dl: DataLayerConfig, refs: list[tuple[str, str, str]], by_name: dict[str, PluginSpec],
                        add_implicit: Callable[..., str]) -> DataLayerConfig:
    for where, name, role in refs:
        if name not in by_name:
            raise ConfigError(f"{where}: no plugin named {name!r} in plugins")
        if not _DATA_ROLES[role](plugin_class(by_name[name].type)):
            raise ConfigError(f"{where}: {name!r} is not a {_DATA_ROLE_NAMES[role]}")
    # The reference injects metrics-data-source -> core-metrics-extractor unless a source of
    # that name is configured or injectDefaults is false.
    if dl.inject_defaults and all(s.plugin_ref != METRICS_SOURCE for s in dl.sources):
        for ptype in (METRICS_SOURCE, METRICS_EXTRACTOR):
            if ptype not in by_name:
                add_implicit(ptype)
        dl.sources.append(DataSourceSpec(METRICS_SOURCE, [METRICS_EXTRACTOR], implicit=True))
    return dl
