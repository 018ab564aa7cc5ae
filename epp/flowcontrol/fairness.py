"""Fairness policies: which flow (fairness id) of a priority band is served next.

The reference's FairnessPolicy plugins (pkg/epp/framework/plugins/flowcontrol/fairness):
global-strict-fairness-policy (the default) and round-robin-fairness-policy, neither with
parameters. The queues hand `pick_flow` the band's non-empty flow queues by fairness id
and the policy's own per-band state (made once by `new_state`); a flow queue offers
`head_key()` (its ordering policy's sort key of the head request, lowest first).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from epp.framework import NamedPlugin


class FlowQueueView(Protocol):
    def __len__(self) -> int: ...

    def head_key(self) -> tuple[Any, ...]: ...


class GlobalStrictFairnessPolicy(NamedPlugin):
    """The flow whose head request comes first by the band's ordering policy, as if the
    band were one queue (global_strict.go)."""

    type_name = "global-strict-fairness-policy"

    def new_state(self) -> None:
        return None

    def pick_flow(self, flows: Mapping[str, FlowQueueView], state: None) -> str | None:
        best: str | None = None
        best_key: tuple[Any, ...] = ()
        for fid, queue in flows.items():
            if not len(queue):
                continue
            key = queue.head_key()
            if best is None or key < best_key:
                best, best_key = fid, key
        return best


@dataclass(slots=True)
class RoundRobinCursor:
    last: str | None = None  # the flow picked last


class RoundRobinFairnessPolicy(NamedPlugin):
    """The flows in turn, by fairness id order, starting after the one picked last
    (roundrobin.go: keys sorted, cursor = last selected). A flow that left the band since
    is placed where it sorted, so the turn continues with the next id after it."""

    type_name = "round-robin-fairness-policy"

    def new_state(self) -> RoundRobinCursor:
        return RoundRobinCursor()

    def pick_flow(self, flows: Mapping[str, FlowQueueView], state: RoundRobinCursor) -> str | None:
        keys = sorted(fid for fid, queue in flows.items() if len(queue))
        if not keys:
            state.last = None
            return None
        start = 0 if state.last is None else bisect.bisect_right(keys, state.last) % len(keys)
        state.last = keys[start]
        return state.last
