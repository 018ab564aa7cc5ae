"""Filters on endpoint labels: a Kubernetes label selector, and the P/D role filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from epp.framework import ROLE_LABEL, CycleState, Endpoint, InferenceRequest, PluginHandle

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(slots=True)
class LabelSelectorRequirement:
    key: str
    operator: str
    values: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.operator not in _OPERATORS:
            raise ValueError(f"operator: expected one of {', '.join(_OPERATORS)}, got {self.operator!r}")
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"values: operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"values: operator {self.operator} takes no values")

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "In":
            return labels.get(self.key) in self.values
        if op == "NotIn":
            return labels.get(self.key) not in self.values  # absent key matches, as in Kubernetes
        if op == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(slots=True)
class LabelSelectorParams:
    matchLabels: dict[str, str] = field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = field(default_factory=list)


class LabelSelectorFilter:
    type_name = "label-selector-filter"
    Params = LabelSelectorParams

    def __init__(self, name: str, params: LabelSelectorParams | None, handle: PluginHandle) -> None:
        p = params or LabelSelectorParams()
        self.name = name
        self.match_labels = tuple(p.matchLabels.items())
        self.expressions = tuple(p.matchExpressions)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        return all(x.matches(labels) for x in self.expressions)

    def filter(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return [e for e in endpoints if self.matches(e.labels)]


class _RoleFilter:
    roles: frozenset[str]
    keep_unlabeled: bool

    def __init__(self, name: str, params: None, handle: PluginHandle) -> None:
        self.name = name

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
    roles = frozenset({"decode", "prefill-decode", "both"})
    keep_unlabeled = True


class PrefillFilter(_RoleFilter):
    type_name = "prefill-filter"
    roles = frozenset({"prefill", "prefill-decode", "both"})
    keep_unlabeled = False
