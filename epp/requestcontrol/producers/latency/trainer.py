"""When the latency model learns: off the hot path, once enough samples are waiting or
the interval has passed (the reference's producer flushes its samples to the training
sidecar every second; the sidecar refits every LATENCY_RETRAINING_INTERVAL_SEC)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .model import LatencyModel, TrainReport

DEFAULT_EVERY_SAMPLES = 256    # train as soon as this many samples wait
DEFAULT_INTERVAL_S = 1.0       # ... or when a sample has waited this long


class Trainer:
    def __init__(self, model: LatencyModel, *, every_samples: int = DEFAULT_EVERY_SAMPLES,
                 interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        if every_samples < 1 or not interval_s >= 0.0:
            raise ValueError("every_samples must be >= 1 and interval_s >= 0")
        self.model, self.every_samples, self.interval_s, self.clock = model, every_samples, interval_s, clock
        self.last = clock()
        self.runs = 0

    def due(self) -> bool:
        pending = self.model.pending
        return pending >= self.every_samples or (pending > 0 and self.clock() - self.last >= self.interval_s)

    def maybe_train(self) -> TrainReport | None:
        """Train now if due (for a caller that already runs off the hot path)."""
        if not self.due():
            return None
        report = self.model.train()
        self.last = self.clock()
        self.runs += 1
        return report
