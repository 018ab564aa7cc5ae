"""Latency model candidates, side by side: `python -m bench.latency_model_cost [--train N] [--seed S]`.

For each candidate learning method: accuracy (MAPE and p90 absolute error of TTFT and
TPOT on fresh samples after learning from N), hot-path prediction cost (us/call, pure
Python, one (class, request) pair) and training cost per 1,000 samples. The samples come
from `VllmLaw`, a synthetic vLLM-like latency law with lognormal noise:
TTFT ~ queueing (waiting requests, prefill tokens in flight) + uncached prompt tokens *
per-token cost, all multiplied past a KV-utilisation knee; TPOT ~ base + per-running-
sequence cost + attention over decode tokens in flight, steeper near a full cache.
The tests reuse the law (tests/test_latency_model*.py).

Candidates:
  ridge-knee      the shipped model (epp/requestcontrol/producers/latency): forgetting ridge on
                  the knee bases, relative (1/y^2) weights
  ridge-knee-p90  the same with the quantile objective 0.9 (LATENCY_OBJECTIVE_TYPE quantile): the
                  typical-latency fit times a calibrated quantile of recent actual/predicted ratios
  ridge-knee-abs  the same, plain least squares (shows what relative weighting buys)
  ridge-raw       ridge on the reference's raw columns, no knee terms (its bayesian_ridge)
  gbt             gradient-boosted trees (depth 3, 100 rounds, lr 0.1, 32 histogram bins) on
                  log latency, refitted with numpy from a 4,096-sample reservoir; predicted in
                  pure Python (what the hot path would run)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from epp.requestcontrol.producers.latency import (
    ForgettingRidge,
    LatencyFeatures,
    LatencyModel,
)

RESERVOIR_SIZE = 4_096   # the gbt candidate's sample reservoir per target


@dataclass(frozen=True)
class VllmLaw:
    """A synthetic vLLM-like server: `speed` scales every cost (2.2 ~ an A100 against an H100)."""
    speed: float = 1.0
    ttft_noise: float = 0.12    # lognormal sigma
    tpot_noise: float = 0.08
    knee: float = 0.85          # KV utilisation where preemption starts to hurt

    def state(self, rng: random.Random) -> LatencyFeatures:
        kv = rng.random() ** 0.7
        running = max(0, int(kv * 48) + rng.randint(-4, 4))
        waiting = rng.randint(0, 12) if kv > 0.8 else rng.randint(0, 2)
        prompt = math.exp(rng.uniform(math.log(32), math.log(8192)))
        prefix = 0.0 if rng.random() < 0.4 else rng.uniform(0.0, 0.95)
        return LatencyFeatures(
            kv_cache_usage=kv, waiting_requests=waiting, running_requests=running, input_tokens=round(prompt),
            prefix_match=prefix, prefill_tokens_in_flight=round(waiting * rng.uniform(200, 2000) + rng.uniform(0, 500)),
            decode_tokens_in_flight=round(running * rng.uniform(300, 1500)))

    def ttft_mean(self, f: LatencyFeatures) -> float:
        uncached = f.input_tokens * (1.0 - f.prefix_match)
        work = 20.0 + 0.045 * uncached + 0.04 * f.prefill_tokens_in_flight + 2.0 * f.waiting_requests \
            + 0.3 * f.running_requests
        over = max(0.0, f.kv_cache_usage - self.knee) / (1.0 - self.knee)
        return self.speed * work * (1.0 + 4.0 * over * over)

    def tpot_mean(self, f: LatencyFeatures) -> float:
        over = max(0.0, f.kv_cache_usage - 0.9) / 0.1
        work = 8.0 + 0.15 * f.running_requests + 1.2e-5 * f.decode_tokens_in_flight + 5e-4 * f.input_tokens
        return self.speed * work * (1.0 + 1.5 * over)

    def sample(self, rng: random.Random) -> tuple[LatencyFeatures, float, float]:
        f = self.state(rng)
        return (f, self.ttft_mean(f) * math.exp(rng.gauss(0.0, self.ttft_noise)),
                self.tpot_mean(f) * math.exp(rng.gauss(0.0, self.tpot_noise)))


def noise_floor_mape(sigma: float, quantile: float = 0.5) -> float:
    """MAPE of a perfect predictor of the median (or of another quantile) under lognormal noise:
    E|e^(sigma (z_q - Z)) - 1|, Z ~ N(0, 1), z_q the standard normal's quantile."""
    rng, z_q = random.Random(0), NormalDist().inv_cdf(quantile)
    return sum(abs(math.exp(sigma * (z_q - rng.gauss(0.0, 1.0))) - 1.0) for _ in range(200_000)) / 200_000


def coverage(predicted: Sequence[float | None], actual: Sequence[float]) -> float:
    """The fraction of actual latencies at or under their prediction (a p90 predictor aims at 0.9)."""
    return sum(1 for p, a in zip(predicted, actual, strict=True) if p is not None and a <= p) / len(actual)


def accuracy(predicted: Sequence[float | None], actual: Sequence[float]) -> tuple[float, float]:
    """(MAPE as a fraction, p90 absolute error); a missing prediction counts as 0."""
    errs = sorted(abs((p or 0.0) - a) for p, a in zip(predicted, actual, strict=True))
    mape = sum(abs((p or 0.0) - a) / a for p, a in zip(predicted, actual, strict=True)) / len(actual)
    return mape, errs[min(len(errs) - 1, math.ceil(0.9 * len(errs)) - 1)]


# -- candidates: each learns from (features, ttft, tpot) and predicts (ttft, tpot) -------------

class Candidate:
    name = ""

    def observe(self, f: LatencyFeatures, ttft: float, tpot: float) -> None: ...

    def train(self) -> None: ...

    def predict_ttft(self, f: LatencyFeatures) -> float | None: ...

    def predict_tpot(self, f: LatencyFeatures) -> float | None: ...


class ShippedModel(Candidate):
    def __init__(self, name: str = "ridge-knee", relative: bool = True, quantile: float | None = None) -> None:
        self.name, self.model = name, LatencyModel(relative=relative, quantile=quantile)

    def observe(self, f: LatencyFeatures, ttft: float, tpot: float) -> None:
        self.model.observe_ttft("h100", f, ttft)
        self.model.observe_tpot("h100", f, tpot)

    def train(self) -> None:
        self.model.train()

    def predict_ttft(self, f: LatencyFeatures) -> float | None:
        return self.model.predict_ttft("h100", f)

    def predict_tpot(self, f: LatencyFeatures) -> float | None:
        return self.model.predict_tpot("h100", f)


def raw_ttft(f: LatencyFeatures) -> tuple[float, ...]:
    return (1.0, f.kv_cache_usage, f.input_tokens, f.waiting_requests, f.running_requests,
            f.prefill_tokens_in_flight, f.prefix_match, f.input_tokens * (1.0 - f.prefix_match))


def raw_tpot(f: LatencyFeatures) -> tuple[float, ...]:
    return (1.0, f.kv_cache_usage, f.input_tokens, f.waiting_requests, f.running_requests,
            f.decode_tokens_in_flight, f.tokens_generated)


class RawRidge(Candidate):
    """The reference's bayesian_ridge columns (plus effective_input_tokens), batch ridge, absolute loss."""
    name = "ridge-raw"

    def __init__(self) -> None:
        self.ttft = ForgettingRidge(8, forgetting=1.0, relative=False)
        self.tpot = ForgettingRidge(7, forgetting=1.0, relative=False)

    def observe(self, f: LatencyFeatures, ttft: float, tpot: float) -> None:
        self.ttft.add(raw_ttft(f), ttft)
        self.tpot.add(raw_tpot(f), tpot)

    def train(self) -> None:
        self.ttft.solve()
        self.tpot.solve()

    def predict_ttft(self, f: LatencyFeatures) -> float | None:
        return self.ttft.predict(raw_ttft(f))

    def predict_tpot(self, f: LatencyFeatures) -> float | None:
        return self.tpot.predict(raw_tpot(f))


class Trees:
    """Gradient-boosted regression trees fitted with numpy histograms, evaluated in pure Python.
    A tree is a flat tuple of nodes (feature, threshold, left, right, value); feature -1 is a leaf."""

    def __init__(self, rounds: int = 100, depth: int = 3, rate: float = 0.1, bins: int = 32) -> None:
        self.rounds, self.depth, self.rate, self.bins = rounds, depth, rate, bins
        self.base = 0.0
        self.trees: list[tuple[tuple[int, float, int, int, float], ...]] = []

    def fit(self, rows: Sequence[Sequence[float]], ys: Sequence[float]) -> None:
        import numpy as np  # not declared: the [bench] extra brings it with matplotlib; main() skips gbt without it
        x = np.asarray(rows, dtype=float)
        y = np.asarray(ys, dtype=float)
        edges = [np.unique(np.quantile(x[:, j], np.linspace(0, 1, self.bins + 1)[1:-1])) for j in range(x.shape[1])]
        codes = np.stack([np.searchsorted(edges[j], x[:, j], side="right") for j in range(x.shape[1])], axis=1)
        self.base = float(y.mean())
        pred = np.full(len(y), self.base)
        self.trees = []
        for _ in range(self.rounds):
            resid = y - pred
            nodes: list[list] = []
            self._grow(codes, edges, resid, np.arange(len(y)), 0, nodes, np)
            tree = tuple((n[0], n[1], n[2], n[3], n[4]) for n in nodes)
            self.trees.append(tree)
            pred += np.array([self._eval(tree, r) for r in x])

    def _grow(self, codes, edges, resid, idx, level, nodes, np) -> int:
        me = len(nodes)
        nodes.append([-1, 0.0, 0, 0, self.rate * float(resid[idx].mean())])
        if level == self.depth or len(idx) < 8:
            return me
        best = (0.0, -1, 0)
        r, total, count = resid[idx], float(resid[idx].sum()), len(idx)
        for j in range(codes.shape[1]):
            sums = np.bincount(codes[idx, j], weights=r, minlength=self.bins)
            cnts = np.bincount(codes[idx, j], minlength=self.bins)
            cs, cc = np.cumsum(sums)[:-1], np.cumsum(cnts)[:-1]
            ok = (cc > 0) & (cc < count)
            if not ok.any():
                continue
            gain = np.where(ok, cs * cs / np.maximum(cc, 1) + (total - cs) ** 2 / np.maximum(count - cc, 1), 0.0)
            b = int(gain.argmax())
            if gain[b] > best[0] and b < len(edges[j]):
                best = (float(gain[b]), j, b)
        if best[1] < 0:
            return me
        j, b = best[1], best[2]
        go_left = codes[idx, j] <= b
        nodes[me][0], nodes[me][1] = j, float(edges[j][b])
        nodes[me][2] = self._grow(codes, edges, resid, idx[go_left], level + 1, nodes, np)
        nodes[me][3] = self._grow(codes, edges, resid, idx[~go_left], level + 1, nodes, np)
        return me

    @staticmethod
    def _eval(tree, row) -> float:
        i = 0
        while True:
            feat, thr, left, right, value = tree[i]
            if feat < 0:
                return value
            i = left if row[feat] < thr else right

    def predict(self, row: Sequence[float]) -> float:
        s, ev = self.base, self._eval
        for tree in self.trees:
            s += ev(tree, row)
        return s


class GradientBoosted(Candidate):
    """Trees on log latency from a bounded reservoir (Vitter's algorithm R, seeded)."""
    name = "gbt"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.seen = 0
        self.reservoir: list[tuple[tuple[float, ...], tuple[float, ...], float, float]] = []
        self.ttft, self.tpot = Trees(), Trees()
        self.ready = False

    def observe(self, f: LatencyFeatures, ttft: float, tpot: float) -> None:
        item = (raw_ttft(f), raw_tpot(f), math.log(ttft), math.log(tpot))
        self.seen += 1
        if len(self.reservoir) < RESERVOIR_SIZE:
            self.reservoir.append(item)
        else:
            k = self.rng.randrange(self.seen)
            if k < RESERVOIR_SIZE:
                self.reservoir[k] = item

    def train(self) -> None:
        if len(self.reservoir) < 64:
            return
        self.ttft.fit([r[0] for r in self.reservoir], [r[2] for r in self.reservoir])
        self.tpot.fit([r[1] for r in self.reservoir], [r[3] for r in self.reservoir])
        self.ready = True

    def predict_ttft(self, f: LatencyFeatures) -> float | None:
        return math.exp(self.ttft.predict(raw_ttft(f))) if self.ready else None

    def predict_tpot(self, f: LatencyFeatures) -> float | None:
        return math.exp(self.tpot.predict(raw_tpot(f))) if self.ready else None


CANDIDATES: dict[str, Callable[[], Candidate]] = {
    "ridge-knee": ShippedModel,
    "ridge-knee-p90": lambda: ShippedModel("ridge-knee-p90", quantile=0.9),
    "ridge-knee-abs": lambda: ShippedModel("ridge-knee-abs", relative=False),
    "ridge-raw": RawRidge,
    "gbt": GradientBoosted,
}


@dataclass(frozen=True)
class Result:
    name: str
    ttft_mape: float
    ttft_p90_ms: float
    tpot_mape: float
    tpot_p90_ms: float
    predict_us: float
    train_ms_per_1k: float
    ttft_coverage: float    # fraction of fresh latencies at or under the prediction
    tpot_coverage: float


def run(name: str, train_n: int, seed: int, law: VllmLaw, train_every: int = 1_000, test_n: int = 2_000) -> Result:
    rng = random.Random(seed)
    cand = CANDIDATES[name]()
    stream = [law.sample(rng) for _ in range(train_n)]
    t0 = time.perf_counter()  # observing and training both count: candidates split the work differently
    for i, sample in enumerate(stream):
        cand.observe(*sample)
        if (i + 1) % train_every == 0 or i + 1 == train_n:
            cand.train()
    train_s = time.perf_counter() - t0
    test = [law.sample(rng) for _ in range(test_n)]
    ttft_pred, ttft = [cand.predict_ttft(f) for f, _, _ in test], [t for _, t, _ in test]
    tpot_pred, tpot = [cand.predict_tpot(f) for f, _, _ in test], [t for _, _, t in test]
    tm, tp = accuracy(ttft_pred, ttft)
    pm, pp = accuracy(tpot_pred, tpot)
    feats = [f for f, _, _ in test[:500]]
    reps = 4
    t0 = time.perf_counter()
    for _ in range(reps):
        for f in feats:
            cand.predict_ttft(f)
            cand.predict_tpot(f)
    predict_us = (time.perf_counter() - t0) / (reps * len(feats) * 2) * 1e6
    return Result(name, tm, tp, pm, pp, predict_us, train_s / train_n * 1e6, coverage(ttft_pred, ttft),
                  coverage(tpot_pred, tpot))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=4_000, help="samples learnt before testing")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--knee", type=float, default=VllmLaw.knee, help="KV utilisation where the law's knee starts")
    ap.add_argument("--only", nargs="*", choices=sorted(CANDIDATES), help="candidates to run (default all)")
    args = ap.parse_args(argv)
    law = VllmLaw(knee=args.knee)
    print(f"law (knee {law.knee}): noise floor MAPE TTFT {noise_floor_mape(law.ttft_noise):.1%}, TPOT "
          f"{noise_floor_mape(law.tpot_noise):.1%}; {args.train} training samples, 2000 test samples, seed {args.seed}")
    print(f"{'candidate':16} {'TTFT MAPE':>9} {'TTFT p90|e|':>11} {'TPOT MAPE':>9} {'TPOT p90|e|':>11} "
          f"{'predict':>10} {'train/1k samples':>17} {'coverage TTFT/TPOT':>19}")
    for name in args.only or CANDIDATES:
        if name == "gbt" and importlib.util.find_spec("numpy") is None:
            print(f"{name:16} skipped: numpy is not installed")
            continue
        r = run(name, args.train, args.seed, law)
        print(f"{r.name:16} {r.ttft_mape:9.1%} {r.ttft_p90_ms:9.1f}ms {r.tpot_mape:9.1%} {r.tpot_p90_ms:9.2f}ms "
              f"{r.predict_us:7.2f} us {r.train_ms_per_1k:14.1f} ms {r.ttft_coverage:9.1%}/{r.tpot_coverage:.1%}")


if __name__ == "__main__":
    main()
