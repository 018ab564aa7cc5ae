"""The victim filter and ordering of in-flight eviction (epp.flowcontrol.eviction), as the
reference's Alpha plugin types (pkg/epp/framework/plugins/flowcontrol/eviction), both
without parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from epp.framework import NamedPlugin

if TYPE_CHECKING:
    from epp.flowcontrol.eviction import EvictionItem


class SheddableEvictionFilter(NamedPlugin):
    """Only sheddable requests (priority < 0) may be evicted."""

    type_name = "sheddable-eviction-filter"

    def accept(self, item: EvictionItem) -> bool:
        return item.priority < 0


class PriorityThenTimeEvictionOrdering(NamedPlugin):
    """Lowest priority first; among equals the most recently dispatched (least KV-cache
    work lost)."""

    type_name = "priority-then-time-eviction-order-policy"

    def less(self, a: EvictionItem, b: EvictionItem) -> bool:
        if a.priority != b.priority:
            return a.priority < b.priority
        return a.dispatch_time > b.dispatch_time


__all__ = ["SheddableEvictionFilter", "PriorityThenTimeEvictionOrdering"]
