"""Filters on endpoint labels: a Kubernetes label selector, and the P/D role filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from epp.framework import ROLE_LABEL, CycleState, Endpoint, InferenceRequest, NamedPlugin, PluginHandle
from epp.framework.plugins import ConfiguredPlugin
from epp.labelselector import LabelSelector, Requirement


@dataclass(slots=True)
class LabelSelectorRequirement:
    key: str
    operator: str
    values: list[str] = field(default_factory=list)

    def validate(self) -> None:
        Requirement(self.key, self.operator, frozenset(self.values))  # raises naming the bad field


@dataclass(slots=True)
class LabelSelectorParams:
    matchLabels: dict[str, str] = field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = field(default_factory=list)


class LabelSelectorFilter(ConfiguredPlugin[LabelSelectorParams]):
    type_name = "label-selector-filter"
    Params = LabelSelectorParams

    def configure(self, p: LabelSelectorParams, handle: PluginHandle) -> None:
        self.selector = LabelSelector.from_spec(p.matchLabels, [(x.key, x.operator, x.values)
                                                                for x in p.matchExpressions])

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.selector.matches(labels)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return [e for e in endpoints if self.matches(e.labels)]


class _RoleFilter(NamedPlugin):
    roles: frozenset[str]
    keep_unlabeled: bool

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        roles, unlabeled = self.roles, self.keep_unlabeled
        out = []
        for e in endpoints:
            role = e.labels.get(ROLE_LABEL)
            if role in roles or (role is None and unlabeled):
                out.append(e)
        return out


class DecodeFilter(_RoleFilter):
    type_name = "decode-filter"
    roles = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    keep_unlabeled = True


class PrefillFilter(_RoleFilter):
    type_name = "prefill-filter"
    roles = frozenset({"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"})
    keep_unlabeled = False


class EncodeFilter(_RoleFilter):
    type_name = "encode-filter"
    roles = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})
    keep_unlabeled = False
