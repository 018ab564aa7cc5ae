"""The EndpointPickerConfig's flowControl section: its typed form (FlowControlConfig, the
priority bands), its parsing, and the check that every policy it names is a plugin of
that kind (the reference's flowcontrol/registry/config.go defaults)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from epp.configvalues import (
    ConfigError,
    check_bool,
    check_int,
    check_list,
    check_mapping,
    check_str,
    parse_duration,
    parse_quantity,
)
from epp.framework.registry import BUILTINS, plugin_class

if TYPE_CHECKING:
    from epp.config import PluginSpec

DEFAULT_BAND_MAX_BYTES = 1_000_000_000
DEFAULT_BAND_MAX_REQUESTS = 5000  # the reference's per-band default (flowcontrol/registry/config.go)
DEFAULT_REQUEST_TTL = 60.0
# the flow-control policy plugins the reference adds under their type names when a config
# does not declare them (config/loader/defaults.go), and the types this project's earlier
# band key fairnessPolicy (global-strict | round-robin) stands for
LEGACY_FAIRNESS_POLICIES = {"global-strict": "global-strict-fairness-policy",
                            "round-robin": "round-robin-fairness-policy"}
DEFAULT_FAIRNESS_POLICY = "global-strict-fairness-policy"
DEFAULT_ORDERING_POLICY = "fcfs-ordering-policy"
DEFAULT_USAGE_LIMIT_POLICY = "static-usage-limit-policy"


@dataclass(slots=True)
class PriorityBandConfig:
    priority: int
    max_bytes: int = DEFAULT_BAND_MAX_BYTES  # "0" or unset in the YAML: this default
    max_requests: int = DEFAULT_BAND_MAX_REQUESTS  # "0" or unset in the YAML: this default
    fairness_policy_ref: str = DEFAULT_FAIRNESS_POLICY  # plugin names
    ordering_policy_ref: str = DEFAULT_ORDERING_POLICY


@dataclass(slots=True)
class FlowControlConfig:
    max_bytes: int = 0  # across all bands; 0 = unlimited
    max_requests: int = 0  # across all bands; 0 = unlimited
    default_request_ttl: float = DEFAULT_REQUEST_TTL  # seconds; 0 = no expiry
    no_endpoint_request_ttl: float | None = None  # while the pool has no endpoint; None = default_request_ttl
    usage_limit_policy_ref: str = DEFAULT_USAGE_LIMIT_POLICY  # plugin name
    priority_bands: list[PriorityBandConfig] = field(default_factory=list)
    # templates for the bands not listed (defaultPriorityBand / defaultNegativePriorityBand)
    default_band: PriorityBandConfig | None = None
    default_negative_band: PriorityBandConfig | None = None
    enable_eviction: bool = False  # evict sheddable requests in flight for blocked higher bands

    def band(self, priority: int) -> PriorityBandConfig:
        for b in self.priority_bands:
            if b.priority == priority:
                return b
        template = self.default_negative_band if priority < 0 else self.default_band
        if template is not None:
            return self.band_from(template, priority)
        if priority < 0 and self.default_band is not None:  # negative priorities fall back to the default band
            return self.band_from(self.default_band, priority)
        return PriorityBandConfig(priority=priority)

    @staticmethod
    def band_from(template: PriorityBandConfig, priority: int) -> PriorityBandConfig:
        return PriorityBandConfig(priority, template.max_bytes, template.max_requests,
                                  template.fairness_policy_ref, template.ordering_policy_ref)

    @property
    def endpointless_ttl(self) -> float:
        """The queue-wait budget while the pool has no endpoint."""
        return self.default_request_ttl if self.no_endpoint_request_ttl is None else self.no_endpoint_request_ttl

    def policy_refs(self) -> list[tuple[str, str, str]]:
        """(key path, plugin name, policy kind) of every policy reference."""
        bands = [(f"flowControl.priorityBands[{i}]", b) for i, b in enumerate(self.priority_bands)]
        for key, b in (("defaultPriorityBand", self.default_band),
                       ("defaultNegativePriorityBand", self.default_negative_band)):
            if b is not None:
                bands.append((f"flowControl.{key}", b))
        refs = [("flowControl.usageLimitPolicyPluginRef", self.usage_limit_policy_ref, "usage-limit"),
                ("flowControl", DEFAULT_FAIRNESS_POLICY, "fairness"),  # the bands no config describes
                ("flowControl", DEFAULT_ORDERING_POLICY, "ordering")]
        for where, b in bands:
            refs.append((f"{where}.fairnessPolicyRef", b.fairness_policy_ref, "fairness"))
            refs.append((f"{where}.orderingPolicyRef", b.ordering_policy_ref, "ordering"))
        return refs


_FLOW_KEYS = ("maxBytes", "maxRequests", "defaultRequestTTL", "noEndpointRequestTTL", "defaultPriorityBand",
              "defaultNegativePriorityBand", "priorityBands", "usageLimitPolicyPluginRef", "saturationDetector",
              "enableEviction")
_BAND_KEYS = ("priority", "maxBytes", "maxRequests", "fairnessPolicyRef", "orderingPolicyRef",
              "fairnessPolicy")  # fairnessPolicy: this project's earlier form (global-strict | round-robin)


def parse_flow_control(raw: Any) -> tuple[FlowControlConfig, Any, bool]:
    """-> (config, the saturationDetector under it, whether settings besides that are set)."""
    where = "flowControl"
    raw = check_mapping(raw, where, _FLOW_KEYS)
    fc = FlowControlConfig()
    if raw.get("maxBytes") is not None:
        fc.max_bytes = parse_quantity(raw["maxBytes"], f"{where}.maxBytes")
    if raw.get("maxRequests") is not None:
        fc.max_requests = _count(raw["maxRequests"], f"{where}.maxRequests")
    if raw.get("defaultRequestTTL") is not None:
        fc.default_request_ttl = parse_duration(raw["defaultRequestTTL"], f"{where}.defaultRequestTTL")
    if raw.get("noEndpointRequestTTL") is not None:
        fc.no_endpoint_request_ttl = parse_duration(raw["noEndpointRequestTTL"], f"{where}.noEndpointRequestTTL")
    if raw.get("defaultPriorityBand") is not None:
        fc.default_band = _parse_band(raw["defaultPriorityBand"], f"{where}.defaultPriorityBand", None)
    if raw.get("defaultNegativePriorityBand") is not None:
        fc.default_negative_band = _parse_band(raw["defaultNegativePriorityBand"],
                                               f"{where}.defaultNegativePriorityBand", None)
    seen: set[int] = set()
    for i, band in enumerate(check_list(raw.get("priorityBands") or [], f"{where}.priorityBands")):
        cfg = _parse_band(band, f"{where}.priorityBands[{i}]", seen)
        fc.priority_bands.append(cfg)
    ref = raw.get("usageLimitPolicyPluginRef")
    if ref:
        fc.usage_limit_policy_ref = check_str(ref, f"{where}.usageLimitPolicyPluginRef")
    if raw.get("enableEviction") is not None:
        fc.enable_eviction = check_bool(raw["enableEviction"], f"{where}.enableEviction")
    settings = any(raw.get(k) is not None for k in _FLOW_KEYS if k != "saturationDetector")
    saturation = raw.get("saturationDetector")
    if saturation is not None:
        saturation = check_mapping(saturation, f"{where}.saturationDetector", ("pluginRef",))
    return fc, saturation, settings


def _parse_band(band: Any, bw: str, seen: set[int] | None) -> PriorityBandConfig:
    """One priority band; `seen` is None for the default band templates (no priority)."""
    band = check_mapping(band, bw, _BAND_KEYS)
    prio = 0
    if seen is not None:
        if "priority" not in band:
            raise ConfigError(f"{bw}.priority: required")
        prio = check_int(band["priority"], f"{bw}.priority")
        if prio in seen:
            raise ConfigError(f"{bw}.priority: duplicate band priority {prio}")
        seen.add(prio)
    elif band.get("priority") is not None:
        check_int(band["priority"], f"{bw}.priority")
    cfg = PriorityBandConfig(priority=prio)
    # "0" is unset: the system default (the reference's resolveQuantity > 0 check)
    if band.get("maxBytes") is not None:
        cfg.max_bytes = parse_quantity(band["maxBytes"], f"{bw}.maxBytes") or DEFAULT_BAND_MAX_BYTES
    if band.get("maxRequests") is not None:
        cfg.max_requests = _count(band["maxRequests"], f"{bw}.maxRequests") or DEFAULT_BAND_MAX_REQUESTS
    if band.get("fairnessPolicy") is not None:
        if band.get("fairnessPolicyRef") is not None:
            raise ConfigError(f"{bw}.fairnessPolicy: not allowed together with fairnessPolicyRef")
        policy = check_str(band["fairnessPolicy"], f"{bw}.fairnessPolicy")
        if policy not in LEGACY_FAIRNESS_POLICIES:
            raise ConfigError(f"{bw}.fairnessPolicy: expected global-strict or round-robin, got {policy!r}")
        cfg.fairness_policy_ref = LEGACY_FAIRNESS_POLICIES[policy]
    if band.get("fairnessPolicyRef"):
        cfg.fairness_policy_ref = check_str(band["fairnessPolicyRef"], f"{bw}.fairnessPolicyRef")
    if band.get("orderingPolicyRef"):
        cfg.ordering_policy_ref = check_str(band["orderingPolicyRef"], f"{bw}.orderingPolicyRef")
    return cfg


def _count(value: Any, where: str) -> int:
    """A request count: an integer or a Kubernetes quantity ("1k"), not negative."""
    if isinstance(value, str):
        try:
            value = parse_quantity(value, where)
        except ConfigError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    n = check_int(value, where)
    if n < 0:
        raise ConfigError(f"{where}: must not be negative")
    return n


# the method each flow-control policy kind has (epp.flowcontrol.queues' protocols)
_POLICY_METHODS = {"fairness": "pick_flow", "ordering": "order_key", "usage-limit": "compute_limit"}


def resolve_flow_policies(flow: FlowControlConfig, by_name: dict[str, PluginSpec],
                           add_implicit: Callable[..., str]) -> None:
    """Every policy reference names a plugin of that kind. A built-in policy type named but
    not declared is added under its type name, as the reference's loader adds the defaults
    (always added here: the bands no config describes use them); the reference wants other
    types declared, this project's earlier `fairnessPolicy: round-robin` relies on it. Any
    other unknown name stops start-up."""
    for where, ref, kind in flow.policy_refs():
        spec = by_name.get(ref)
        if spec is None:
            if ref not in BUILTINS or not callable(getattr(plugin_class(ref), _POLICY_METHODS[kind], None)):
                raise ConfigError(f"{where}: no {kind} policy plugin named {ref!r} in plugins")
            add_implicit(ref)
            continue
        if not callable(getattr(plugin_class(spec.type), _POLICY_METHODS[kind], None)):
            article = "an" if kind[0] in "aeiou" else "a"
            raise ConfigError(f"{where}: plugin {ref!r} ({spec.type}) is not {article} {kind} policy")
