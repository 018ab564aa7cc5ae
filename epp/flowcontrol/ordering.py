"""Ordering policies: which request of a flow queue is served first.

The reference's OrderingPolicy plugins (pkg/epp/framework/plugins/flowcontrol/ordering),
none with parameters: fcfs-ordering-policy (the default; enqueue time), edf-ordering-policy
(earliest deadline = enqueue time + the request's effective TTL; no TTL = last; ties by
enqueue time) and slo-deadline-ordering-policy (deadline = arrival + the
x-llm-d-slo-ttft-ms header's milliseconds; no or bad header = last; ties by arrival).
The reference's Less(a, b) is expressed as a sort key: a < b by key <=> Less(a, b).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from epp.framework import NamedPlugin
from epp.framework.headers import SLO_TTFT_MS as SLO_TTFT_HEADER  # what slo-deadline-ordering-policy reads

_MAX_SLO_MS = (2**63 - 1) // 1_000_000  # the reference refuses values whose nanoseconds overflow int64


class QueuedRequest(Protocol):
    """What an ordering policy sees of a queued request."""

    enqueued: float  # seconds, the admission clock
    ttl: float  # the effective queue TTL in seconds; <= 0 = none

    @property
    def headers(self) -> Mapping[str, str]: ...


class FCFSOrderingPolicy(NamedPlugin):
    type_name = "fcfs-ordering-policy"

    def order_key(self, item: QueuedRequest) -> tuple[Any, ...]:
        return (item.enqueued,)


class EDFOrderingPolicy(NamedPlugin):
    type_name = "edf-ordering-policy"

    def order_key(self, item: QueuedRequest) -> tuple[Any, ...]:
        deadline = item.enqueued + item.ttl if item.ttl > 0 else math.inf
        return (deadline, item.enqueued)


class SLODeadlineOrderingPolicy(NamedPlugin):
    type_name = "slo-deadline-ordering-policy"

    def order_key(self, item: QueuedRequest) -> tuple[Any, ...]:
        return (item.enqueued + slo_ttft_seconds(item.headers), item.enqueued)


def slo_ttft_seconds(headers: Mapping[str, str]) -> float:
    """The TTFT SLO of the header in seconds; inf when absent or not a non-negative integer."""
    raw = headers.get(SLO_TTFT_HEADER, "").strip()
    if not raw or not (raw.isdigit() or (raw[0] == "+" and raw[1:].isdigit())):
        return math.inf
    ms = int(raw)
    return ms / 1000.0 if ms <= _MAX_SLO_MS else math.inf
