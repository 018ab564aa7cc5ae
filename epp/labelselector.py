"""Kubernetes label selectors: one matcher for pool selectors, `--endpoint-selector`
and the label-selector-filter.

Semantics as in k8s.io/apimachinery: requirements are ANDed; `In` matches a present key
with a listed value; `NotIn` matches an absent key or an unlisted value; `Exists` and
`DoesNotExist` test the key only; an empty selector matches everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

IN, NOT_IN, EXISTS, DOES_NOT_EXIST = "In", "NotIn", "Exists", "DoesNotExist"
OPERATORS = (IN, NOT_IN, EXISTS, DOES_NOT_EXIST)

_KEY = r"[\w./-]+"
_SET = re.compile(rf"({_KEY})\s+(in|notin)\s+\(([^)]*)\)")
_EQUALITY = re.compile(rf"({_KEY})\s*(==|=|!=)\s*([\w./-]*)")
_EXISTENCE = re.compile(rf"(!?)({_KEY})")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # one of OPERATORS
    values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"operator: expected one of {', '.join(OPERATORS)}, got {self.operator!r}")
        if self.operator in (IN, NOT_IN) and not self.values:
            raise ValueError(f"values: operator {self.operator} needs at least one value")
        if self.operator in (EXISTS, DOES_NOT_EXIST) and self.values:
            raise ValueError(f"values: operator {self.operator} takes no values")

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == IN:
            return labels.get(self.key) in self.values
        if op == NOT_IN:
            return labels.get(self.key) not in self.values  # an absent key matches
        if op == EXISTS:
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @classmethod
    def from_match_labels(cls, match_labels: Mapping[str, str]) -> LabelSelector:
        return cls.from_spec(match_labels, ())

    @classmethod
    def from_spec(cls, match_labels: Mapping[str, str],
                  match_expressions: Iterable[tuple[str, str, Iterable[str]]]) -> LabelSelector:
        """metav1.LabelSelector: matchLabels plus matchExpressions as (key, operator, values)."""
        reqs = [Requirement(k, IN, frozenset([v])) for k, v in sorted(match_labels.items())]
        reqs += [Requirement(key, op, frozenset(values)) for key, op, values in match_expressions]
        return cls(tuple(reqs))

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """The string syntax: `a=b,c!=d,e in (x,y),f notin (z),g,!h`."""
        reqs: list[Requirement] = []
        for part in _split_top_level(text):
            part = part.strip()
            if not part:
                continue
            try:
                reqs.append(_requirement(part))
            except ValueError as e:
                raise ValueError(f"invalid label selector {text!r}: {e}") from None
        return cls(tuple(reqs))


def _requirement(part: str) -> Requirement:
    m = _SET.fullmatch(part)
    if m:
        values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
        return Requirement(m.group(1), IN if m.group(2) == "in" else NOT_IN, values)
    m = _EQUALITY.fullmatch(part)
    if m:
        return Requirement(m.group(1), NOT_IN if m.group(2) == "!=" else IN, frozenset([m.group(3)]))
    m = _EXISTENCE.fullmatch(part)
    if m:
        return Requirement(m.group(2), DOES_NOT_EXIST if m.group(1) else EXISTS)
    raise ValueError(f"cannot parse {part!r}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts
