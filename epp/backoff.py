"""Capped exponential backoff, shared by every loop that retries a remote peer (the
Kubernetes reflectors, the kv-events subscriptions)."""

from __future__ import annotations

import random


class Backoff:
    """Delays base, 2*base, 4*base, ... capped at `cap`, each spread by +-`jitter` (a fraction;
    0: exact); `reset()` after a success starts again from `base`."""

    def __init__(self, base: float = 0.2, cap: float = 30.0, jitter: float = 0.2) -> None:
        self.base, self.cap, self.jitter, self.failures = base, cap, jitter, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.failures)
        self.failures += 1
        return delay * random.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else delay

    def reset(self) -> None:
        self.failures = 0
