"""Clocks that drive the engine model: real time (asyncio) or virtual time (discrete events).

The engine never reads a clock itself; an EngineLoop asks a Clock for `now()` and
schedules the end of each batch step with `call_at`, so the same engine code serves
HTTP in real time and a cluster simulation of hundreds of engines in virtual time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle: ...


class AsyncioClock:
    """Real time on an asyncio loop, optionally sped up.

    time_scale is simulated seconds per wall second: 10 runs ten times faster than real
    time. now() starts at 0 when the clock is made."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.loop = loop or asyncio.get_running_loop()
        self.time_scale = time_scale
        self._origin = self.loop.time()

    def now(self) -> float:
        return (self.loop.time() - self._origin) * self.time_scale

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        return self.loop.call_at(self._origin + when / self.time_scale, callback)

    def wall_seconds(self, sim_seconds: float) -> float:
        return sim_seconds / self.time_scale


class _VirtualHandle:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Discrete-event time: a heap of (when, seq, callback); callbacks run in time order,
    ties in scheduling order. Time only moves when run() pops the next event."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._heap: list[tuple[float, int, _VirtualHandle, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = _VirtualHandle()
        # An event in the past runs "now": virtual time never goes backwards.
        heapq.heappush(self._heap, (max(when, self._now), next(self._seq), handle, callback))
        return handle

    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle:
        return self.call_at(self._now + delay, callback)

    def pending(self) -> int:
        return sum(1 for e in self._heap if not e[2].cancelled)

    def run(self, until: float | None = None) -> int:
        """Run events with time <= until (all if None); returns how many ran. With
        `until`, the clock ends at `until` even if the last event was earlier."""
        ran = 0
        heap = self._heap
        while heap and (until is None or heap[0][0] <= until):
            when, _, handle, callback = heapq.heappop(heap)
            if handle.cancelled:
                continue
            self._now = when
            callback()
            ran += 1
        if until is not None and until > self._now:
            self._now = until
        return ran

    def run_until_idle(self) -> int:
        return self.run(None)

    def run_until(self, predicate: Callable[[], bool], limit: float | None = None) -> bool:
        """Run events one by one until predicate() holds (True) or none are left / time
        passes `limit` (False)."""
        heap = self._heap
        while not predicate():
            if not heap or (limit is not None and heap[0][0] > limit):
                return False
            when, _, handle, callback = heapq.heappop(heap)
            if handle.cancelled:
                continue
            self._now = when
            callback()
        return True
