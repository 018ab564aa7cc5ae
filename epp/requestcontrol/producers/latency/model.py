"""The online latency model: per (endpoint class, target) an exponentially forgetting
ridge regression on the fixed bases of features.py, plus one pool-wide regression per
target that answers while a class is still young.

Why this method (measured by bench/latency_model_cost.py, figures in the package
docstring): on a vLLM-like synthetic law its MAPE lands 0.4 points above the noise floor
after 4,000 samples (1.4-2.5 points when the law's knee moves off its knots), it learns
faster than trees from 1,000 samples, predicts in
a few microseconds of pure Python (a dot product of about fifteen floats), and its
state is O(d^2) numbers whatever the sample count, so it needs no reservoir. Gradient-
boosted trees refitted from a reservoir were as accurate at best, cost ~10x per
prediction in Python and need numpy to refit. Forgetting (weight `forgetting ** age`)
follows a server whose speed drifts.

Hot path: `predict*` reads one published tuple of weights; no locks, no I/O, no fitting.
`observe_*` only validates and appends to a bounded queue. `train()` (called off the hot
path by trainer.py) drains the queue into the sufficient statistics, scores each sample
against the weights of the moment first (a prequential error, exported by `errors()`),
and solves the small normal equations again."""

from __future__ import annotations

import math
import operator
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .features import (
    DEFAULT_CLASS,
    MAX_CLASS_CHARS,
    TPOT_BASIS,
    TTFT_BASIS,
    LatencyFeatures,
    clean,
    finite_positive,
    tpot_basis,
    ttft_basis,
)

# Bounds, each named where it is defined.
PENDING_MAX = 8_192            # observed samples waiting for train(); the oldest are dropped beyond
MAX_CLASSES = 32               # endpoint classes with their own model; later classes use the pool's
ERROR_WINDOW = 1_000           # most recent prequential errors kept per (class, target)
MAX_LATENCY_MS = 3_600_000.0   # a latency above an hour is a broken clock, not a sample
# Defaults, chosen by the benchmark.
DEFAULT_FORGETTING = 0.999     # effective memory ~1/(1-f) = 1,000 samples
DEFAULT_RIDGE = 1e-6           # relative to each feature's own scale (diagonal), so units do not matter
MIN_SAMPLES = 64               # samples before a regression answers (its basis has 13-16 terms)
QUANTILE_MIN_SAMPLES = 50     # residuals in a band (or in all) before the quantile objective uses them
BAND_WINDOW = 256              # most recent residuals kept per octave band of the typical prediction
BAND_RANGE = (-8, 24)          # octave bands 2^-8 .. 2^24 ms; predictions beyond share the end bands
LATENCY_FLOOR_MS = 0.1         # relative weighting divides by max(latency, floor)
POOL = "*"                     # the pool-wide model's key in errors()
# The objective, from the environment variables of the reference's predictor servers. Unset, it is what
# both reference charts deploy them with: "mean" (GIE v1.5 config/charts/epplib/values.yaml, llm-d-router
# config/charts/routerlib/values.yaml; the charts put it on the sidecars, not on the picker's container).
# The servers' own code default is "quantile" with alpha 0.9 (latencypredictor/prediction_server.py); the
# alpha default applies when LATENCY_OBJECTIVE_TYPE=quantile is set without LATENCY_QUANTILE_ALPHA.
OBJECTIVE_ENV, QUANTILE_ALPHA_ENV = "LATENCY_OBJECTIVE_TYPE", "LATENCY_QUANTILE_ALPHA"
DEFAULT_OBJECTIVE, DEFAULT_QUANTILE_ALPHA = "mean", 0.9


class Target(StrEnum):
    TTFT = "ttft"
    TPOT = "tpot"


BASES: dict[Target, tuple[Callable[[LatencyFeatures], tuple[float, ...]], tuple[str, ...]]] = {
    Target.TTFT: (ttft_basis, TTFT_BASIS),
    Target.TPOT: (tpot_basis, TPOT_BASIS),
}


class ForgettingRidge:
    """Weighted least squares with exponential forgetting, kept as sufficient statistics
    (upper triangle of sum w x x^T, and sum w x y); `solve()` publishes new weights.
    `relative` weighs each sample by 1/y^2, so the fit minimises relative error (MAPE's
    cousin) instead of letting the slowest requests dominate."""

    __slots__ = ("size", "forgetting", "ridge", "relative", "samples", "weights", "calibration", "floor", "_a",
                 "_b")

    def __init__(self, size: int, *, forgetting: float = DEFAULT_FORGETTING, ridge: float = DEFAULT_RIDGE,
                 relative: bool = True, quantile: float | None = None) -> None:
        if not 0.0 < forgetting <= 1.0 or ridge < 0.0:
            raise ValueError("forgetting must be in (0, 1] and ridge >= 0")
        self.size, self.forgetting, self.ridge, self.relative = size, forgetting, ridge, relative
        self.samples = 0
        self.weights: tuple[float, ...] | None = None
        # a quantile objective: predictions are the typical latency times a calibrated residual quantile
        self.calibration = None if quantile is None else ResidualQuantile(quantile)
        # the fastest latency learnt: a fit extrapolating below it (collinear features, few samples in
        # that corner) is not believed, so a prediction is never under it (nor 0, which passes any SLO)
        self.floor = math.inf
        self._a = [[0.0] * (size - i) for i in range(size)]
        self._b = [0.0] * size

    def predict(self, x: Sequence[float]) -> float | None:
        w = self.weights
        if w is None:
            return None
        y = sum(map(operator.mul, w, x))
        y = y if y > self.floor else self.floor
        c = self.calibration
        return y if c is None else c.apply(y)

    def typical(self, x: Sequence[float]) -> float | None:
        """The typical latency (the objective "mean"): the fit, never under the fastest latency learnt."""
        w = self.weights
        return None if w is None else max(sum(map(operator.mul, w, x)), self.floor)

    def add(self, x: Sequence[float], y: float) -> None:
        lam = self.forgetting
        wt = 1.0 / max(y, LATENCY_FLOOR_MS) ** 2 if self.relative else 1.0
        a, b = self._a, self._b
        for i, xi in enumerate(x):
            wx = wt * xi
            a[i] = [r * lam + wx * xj for r, xj in zip(a[i], x[i:], strict=True)]  # row i holds j >= i
            b[i] = b[i] * lam + wx * y
        self.samples += 1
        self.floor = min(self.floor, y)

    def add_batch(self, xs: Sequence[Sequence[float]], ys: Sequence[float]) -> None:
        """The same as add() for each pair in order, but one C-level loop per matrix entry
        over the whole batch instead of one Python loop per sample (~10x faster)."""
        n = len(ys)
        if n == 0:
            return
        lam = self.forgetting
        g = [lam ** (n - 1 - k) for k in range(n)]  # the later a sample, the less it has decayed
        if self.relative:
            g = [gk / max(y, LATENCY_FLOOR_MS) ** 2 for gk, y in zip(g, ys, strict=True)]
        cols = list(zip(*xs, strict=True))
        decay = lam ** n
        a, b = self._a, self._b
        for i, col in enumerate(cols):
            wcol = list(map(operator.mul, g, col))
            row = a[i]
            for j in range(i, self.size):
                row[j - i] = row[j - i] * decay + sum(map(operator.mul, wcol, cols[j]))
            b[i] = b[i] * decay + sum(map(operator.mul, wcol, ys))
        self.samples += n
        self.floor = min(self.floor, *ys)

    def solve(self) -> None:
        """Jacobi-scaled ridge solve by Cholesky; a term never seen gets weight 0."""
        n, a = self.size, self._a
        d = [math.sqrt(a[i][0]) if a[i][0] > 0.0 else 0.0 for i in range(n)]
        m = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i, n):
                v = a[i][j - i] / (d[i] * d[j]) if d[i] and d[j] else (1.0 if i == j else 0.0)
                m[i][j] = m[j][i] = v
            m[i][i] += self.ridge
        rhs = [self._b[i] / d[i] if d[i] else 0.0 for i in range(n)]
        z = _cholesky_solve(m, rhs)
        if z is None or not all(math.isfinite(v) for v in z):
            return  # keep the last good weights
        self.weights = tuple(z[i] / d[i] if d[i] else 0.0 for i in range(n))


def _cholesky_solve(m: list[list[float]], rhs: list[float]) -> list[float] | None:
    n = len(rhs)
    low = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = m[i][j] - sum(low[i][k] * low[j][k] for k in range(j))
            if i == j:
                if s <= 0.0:
                    return None
                low[i][i] = math.sqrt(s)
            else:
                low[i][j] = s / low[j][j]
    y = [0.0] * n
    for i in range(n):
        y[i] = (rhs[i] - sum(low[i][k] * y[k] for k in range(i))) / low[i][i]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (y[i] - sum(low[k][i] * x[k] for k in range(i + 1, n))) / low[i][i]
    return x


@dataclass(frozen=True, slots=True)
class ErrorStats:
    """Prediction error over the last ERROR_WINDOW samples, each scored before it was learnt."""
    samples: int                # in the window
    mape: float                 # mean |pred - actual| / actual, a fraction (0.1 = 10 %)
    p90_abs_error_ms: float
    coverage: float             # fraction of actual <= predicted (a p90 objective aims at 0.9)


class ErrorWindow:
    __slots__ = ("_err", "_rel")

    def __init__(self, size: int = ERROR_WINDOW) -> None:
        self._err: deque[float] = deque(maxlen=size)     # predicted - actual
        self._rel: deque[float] = deque(maxlen=size)     # |predicted - actual| / actual

    def add(self, predicted: float, actual: float) -> None:
        err = predicted - actual
        self._err.append(err)
        self._rel.append(abs(err) / actual)

    def stats(self) -> ErrorStats | None:
        if not self._err:
            return None
        n = len(self._err)
        return ErrorStats(n, sum(self._rel) / n, _quantile(sorted(map(abs, self._err)), 0.9),
                          sum(1 for e in self._err if e >= 0.0) / n)



class ResidualQuantile:
    """Turns a typical-latency prediction into a q-quantile one: typical x exp(the q-quantile of
    recent residuals log(actual / typical)), learnt per octave band of the typical prediction
    (a loose fit misses a 50 ms prediction by another factor than a 5 s one), else over all
    bands while a band is young. Each residual is against the typical prediction consumers saw
    before the sample was learnt. Bounded: the most recent BAND_WINDOW residuals per band (at
    most BAND_RANGE's bands) and ERROR_WINDOW over all. `apply` is the hot path (one frexp
    and one dict lookup); `update` (training) publishes new factors."""
    __slots__ = ("q", "_bands", "_all", "factors", "factor")

    def __init__(self, q: float) -> None:
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {q}")
        self.q = q
        self._bands: dict[int, deque[float]] = {}
        self._all: deque[float] = deque(maxlen=ERROR_WINDOW)
        self.factors: dict[int, float] = {}   # per band with enough residuals
        self.factor = 1.0                     # over all bands (1 until enough residuals)

    def add(self, typical: float, actual: float) -> None:
        r = math.log(actual / typical)
        band = self._bands.get(b := _band(typical))
        if band is None:
            band = self._bands[b] = deque(maxlen=BAND_WINDOW)
        band.append(r)
        self._all.append(r)

    def update(self) -> None:
        q = self.q
        if len(self._all) >= QUANTILE_MIN_SAMPLES:
            self.factor = math.exp(_quantile(sorted(self._all), q))
        self.factors = {b: math.exp(_quantile(sorted(d), q)) for b, d in self._bands.items()
                        if len(d) >= QUANTILE_MIN_SAMPLES}

    def apply(self, typical: float) -> float:
        return typical * self.factors.get(_band(typical), self.factor)


def _band(latency_ms: float) -> int:
    """The octave of a (positive) latency, clamped to BAND_RANGE."""
    lo, hi = BAND_RANGE
    return min(max(math.frexp(latency_ms)[1], lo), hi)


def objective_from_env(env: Mapping[str, str] = os.environ) -> float | None:
    """The objective from the predictor servers' environment variables: LATENCY_OBJECTIVE_TYPE
    "mean" (the default: what both reference charts deploy) predicts the typical latency (None);
    "quantile" predicts the LATENCY_QUANTILE_ALPHA quantile (default 0.9). Anything else, or an
    alpha outside (0, 1) whichever the objective, raises ValueError."""
    kind = env.get(OBJECTIVE_ENV, DEFAULT_OBJECTIVE)
    if kind not in ("quantile", "mean"):
        raise ValueError(f"{OBJECTIVE_ENV}: must be 'quantile' or 'mean', got {kind!r}")
    raw = env.get(QUANTILE_ALPHA_ENV, str(DEFAULT_QUANTILE_ALPHA))
    try:
        alpha = float(raw)
    except ValueError:
        alpha = math.nan
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"{QUANTILE_ALPHA_ENV}: must be a number in (0, 1), got {raw!r}")
    return alpha if kind == "quantile" else None


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class _Regressions:
    """The TTFT and TPOT regressions of one class (or of the pool), with their errors."""
    __slots__ = ("ridge", "errors")

    def __init__(self, forgetting: float, ridge: float, relative: bool, quantile: float | None) -> None:
        self.ridge = {t: ForgettingRidge(len(names), forgetting=forgetting, ridge=ridge, relative=relative,
                                         quantile=quantile) for t, (_, names) in BASES.items()}
        self.errors = {t: ErrorWindow() for t in Target}


@dataclass(frozen=True, slots=True)
class LatencyPrediction:
    ttft_ms: float | None
    tpot_ms: float | None


@dataclass(frozen=True, slots=True)
class TrainReport:
    samples: int        # drained from the queue into the statistics
    solved: int         # regressions whose weights were published again


class LatencyModel:
    """One pool's latency model. Thread-safe for one trainer and any number of predictors
    and observers: predictions read immutable published weights, observers append to a
    deque, and train() is serialised by a lock."""

    def __init__(self, *, forgetting: float = DEFAULT_FORGETTING, ridge: float = DEFAULT_RIDGE,
                 min_samples: int = MIN_SAMPLES, relative: bool = True, max_classes: int = MAX_CLASSES,
                 pending_max: int = PENDING_MAX, quantile: float | None = None) -> None:
        """`quantile` None predicts the typical latency (the reference's objective "mean", which
        its charts deploy); a fraction such as 0.9 predicts that quantile (the objective
        "quantile", its servers' code default): the typical prediction times a residual quantile
        calibrated online (ResidualQuantile)."""
        if not 0.0 < forgetting <= 1.0 or ridge < 0.0 or min_samples < 1 or max_classes < 0 or pending_max < 1 \
                or not (quantile is None or 0.0 < quantile < 1.0):
            raise ValueError("invalid latency model parameters")
        self.quantile = quantile
        self._args = (forgetting, ridge, relative, quantile)
        self.min_samples, self.max_classes = min_samples, max_classes
        self._pool = _Regressions(*self._args)
        self._classes: dict[str, _Regressions] = {}
        self._pending: deque[tuple[str, Target, LatencyFeatures, float]] = deque(maxlen=pending_max)
        self._lock = threading.Lock()
        self.rejected = 0       # hostile or out-of-range samples ignored
        self.dropped = 0        # samples lost to a full queue (train() not keeping up)

    # -- hot path ---------------------------------------------------------------------

    def predict_ttft(self, endpoint_class: str, features: LatencyFeatures) -> float | None:
        return self._predict(endpoint_class, Target.TTFT, features)

    def predict_tpot(self, endpoint_class: str, features: LatencyFeatures) -> float | None:
        return self._predict(endpoint_class, Target.TPOT, features)

    def predict(self, endpoint_class: str, features: LatencyFeatures) -> LatencyPrediction:
        """Both targets; a target not learnt yet (or hostile features) gives None."""
        f = clean(features)
        if f is None:
            return LatencyPrediction(None, None)
        ttft, tpot = self._regression(endpoint_class, Target.TTFT), self._regression(endpoint_class, Target.TPOT)
        return LatencyPrediction(None if ttft is None else ttft.predict(ttft_basis(f)),
                                 None if tpot is None else tpot.predict(tpot_basis(f)))

    def _predict(self, endpoint_class: str, target: Target, features: LatencyFeatures) -> float | None:
        f = clean(features)
        if f is None:
            return None
        reg = self._regression(endpoint_class, target)
        return None if reg is None else reg.predict(BASES[target][0](f))

    def _regression(self, endpoint_class: str, target: Target) -> ForgettingRidge | None:
        """The class's regression once it has learnt, else the pool's, else None."""
        regs = self._classes.get(endpoint_class) if type(endpoint_class) is str else None
        for reg in (None if regs is None else regs.ridge[target], self._pool.ridge[target]):
            if reg is not None and reg.samples >= self.min_samples and reg.weights is not None:
                return reg
        return None

    # -- response path: O(1) ----------------------------------------------------------

    def observe_ttft(self, endpoint_class: str, features: LatencyFeatures, ttft_ms: float) -> bool:
        return self._observe(endpoint_class, Target.TTFT, features, ttft_ms)

    def observe_tpot(self, endpoint_class: str, features: LatencyFeatures, tpot_ms: float) -> bool:
        return self._observe(endpoint_class, Target.TPOT, features, tpot_ms)

    def _observe(self, endpoint_class: str, target: Target, features: LatencyFeatures, latency_ms: float) -> bool:
        f = clean(features)
        if f is None or not finite_positive(latency_ms, MAX_LATENCY_MS) or not isinstance(endpoint_class, str):
            self.rejected += 1
            return False
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append((endpoint_class[:MAX_CLASS_CHARS] or DEFAULT_CLASS, target, f, float(latency_ms)))
        return True

    # -- background ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending)

    def train(self) -> TrainReport:
        """Drain the queue into the statistics and publish new weights; off the hot path."""
        with self._lock:
            batches: dict[ForgettingRidge, tuple[ErrorWindow, list[tuple[float, ...]], list[float]]] = {}
            n = 0
            while self._pending:
                cls, target, f, y = self._pending.popleft()
                x = BASES[target][0](f)
                for regs in (self._pool, self._class(cls)):
                    if regs is not None:
                        reg = regs.ridge[target]
                        _, xs, ys = batches.setdefault(reg, (regs.errors[target], [], []))
                        xs.append(x)
                        ys.append(y)
                n += 1
            solved = 0
            for reg, (window, xs, ys) in batches.items():
                cal = reg.calibration
                if reg.samples >= self.min_samples and reg.weights is not None:
                    for x, y in zip(xs, ys, strict=True):  # against the weights consumers saw
                        typical = reg.typical(x) or 0.0
                        window.add(typical if cal is None else cal.apply(typical), y)
                        if cal is not None:
                            cal.add(typical, y)
                reg.add_batch(xs, ys)
                if reg.samples >= min(self.min_samples, reg.size + 1):
                    reg.solve()
                    solved += 1
                if cal is not None:
                    cal.update()
            return TrainReport(n, solved)

    def _class(self, endpoint_class: str) -> _Regressions | None:
        regs = self._classes.get(endpoint_class)
        if regs is None and len(self._classes) < self.max_classes:
            regs = self._classes[endpoint_class] = _Regressions(*self._args)
        return regs

    # -- introspection (metrics, `epp endpoints`) -----------------------------------------

    def classes(self) -> list[str]:
        with self._lock:
            return sorted(self._classes)

    def samples(self, endpoint_class: str, target: Target) -> int:
        regs = self._pool if endpoint_class == POOL else self._classes.get(endpoint_class)
        return 0 if regs is None else regs.ridge[target].samples

    def errors(self) -> dict[tuple[str, Target], ErrorStats]:
        """Recent prediction error per (class, target); the pool-wide model under POOL."""
        out = {}
        with self._lock:
            for name, regs in [(POOL, self._pool), *sorted(self._classes.items())]:
                for target in Target:
                    stats = regs.errors[target].stats()
                    if stats is not None:
                        out[(name, target)] = stats
        return out

    def coefficients(self, endpoint_class: str, target: Target) -> dict[str, float] | None:
        """The published weights by basis term name (the reference's /model coefficients, for explain)."""
        regs = self._pool if endpoint_class == POOL else self._classes.get(endpoint_class)
        w = None if regs is None else regs.ridge[target].weights
        return None if w is None else dict(zip(BASES[target][1], w, strict=True))
