"""The online latency model learns a vLLM-like latency law (bench.latency_model_cost.VllmLaw)
per endpoint class, stays bounded, shrugs off hostile values, and is deterministic.

Thresholds: the law's lognormal noise alone gives a perfect predictor a MAPE of 9.6 % on
TTFT and 6.4 % on TPOT (noise_floor_mape); the model must land within 5 points of that
floor after 2,000 samples. Ignoring one input the law depends on (the prefix-cache match)
or pooling a fast and a slow class costs well over those 5 points, so those must fail."""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import sys
import types

import pytest

from bench.latency_model_cost import VllmLaw, accuracy, noise_floor_mape
from epp.requestcontrol.producers.latency import (
    DEFAULT_CLASS,
    ERROR_WINDOW,
    POOL,
    ForgettingRidge,
    LatencyFeatures,
    LatencyModel,
    Target,
    endpoint_class,
    ttft_basis,
)
from epp.requestcontrol.producers.latency.model import objective_from_env
from epp.requestcontrol.producers.latency.trainer import Trainer

H100, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"
TTFT_BOUND, TPOT_BOUND = 0.096 + 0.05, 0.064 + 0.05


def feed(model: LatencyModel, law: VllmLaw, rng: random.Random, n: int, cls: str = H100,
         transform=lambda f: f, train_every: int = 256) -> None:
    for i in range(n):
        f, ttft, tpot = law.sample(rng)
        model.observe_ttft(cls, transform(f), ttft)
        model.observe_tpot(cls, transform(f), tpot)
        if (i + 1) % train_every == 0:
            model.train()
    model.train()


def held_out_mape(model, law, rng, cls=H100, transform=lambda f: f, n=1_000):
    test = [law.sample(rng) for _ in range(n)]
    ttft = accuracy([model.predict_ttft(cls, transform(f)) for f, _, _ in test], [t for _, t, _ in test])
    tpot = accuracy([model.predict_tpot(cls, transform(f)) for f, _, _ in test], [t for _, _, t in test])
    return ttft[0], tpot[0]


def test_converges_on_the_synthetic_law_within_five_points_of_the_noise_floor():
    model, law, rng = LatencyModel(), VllmLaw(), random.Random(7)
    assert model.predict_ttft(H100, law.state(rng)) is None  # nothing learnt: no guess
    feed(model, law, rng, 2_000)
    ttft_mape, tpot_mape = held_out_mape(model, law, rng)
    assert ttft_mape < TTFT_BOUND and tpot_mape < TPOT_BOUND, (ttft_mape, tpot_mape)
    # the prequential error it will export agrees, and p90 absolute error is a latency in ms
    errors = model.errors()
    assert errors[(H100, Target.TTFT)].samples == ERROR_WINDOW
    assert errors[(H100, Target.TTFT)].mape < TTFT_BOUND + 0.02
    assert 10.0 < errors[(H100, Target.TTFT)].p90_abs_error_ms < 1_000.0
    assert errors[(H100, Target.TPOT)].mape < TPOT_BOUND + 0.02


@pytest.mark.parametrize("ignored", ["prefix_match", "kv_cache_usage", "input_tokens", "prefill_tokens_in_flight"])
def test_a_model_that_ignores_an_input_of_the_law_fails_the_same_bound(ignored):
    model, law, rng = LatencyModel(), VllmLaw(), random.Random(7)
    blind = lambda f: dataclasses.replace(f, **{ignored: 0.0})  # noqa: E731
    feed(model, law, rng, 2_000, transform=blind)
    ttft_mape, _ = held_out_mape(model, law, rng, transform=blind)
    assert ttft_mape > TTFT_BOUND, ttft_mape


def test_prefix_match_lowers_the_predicted_ttft():
    model, law, rng = LatencyModel(), VllmLaw(), random.Random(3)
    feed(model, law, rng, 2_000)
    cold = LatencyFeatures(kv_cache_usage=0.3, running_requests=10, input_tokens=4_000, prefix_match=0.0)
    warm = dataclasses.replace(cold, prefix_match=0.9)
    assert model.predict_ttft(H100, warm) < 0.5 * model.predict_ttft(H100, cold)
    # and a KV cache past the knee raises it
    assert model.predict_ttft(H100, dataclasses.replace(cold, kv_cache_usage=0.99)) > \
        1.5 * model.predict_ttft(H100, cold)


def test_fast_and_slow_hardware_are_learnt_apart():
    model, rng = LatencyModel(), random.Random(11)
    fast, slow = VllmLaw(speed=1.0), VllmLaw(speed=2.2)
    for i in range(2_000):
        for cls, law in ((H100, fast), (A100, slow)):
            f, ttft, tpot = law.sample(rng)
            model.observe_ttft(cls, f, ttft)
            model.observe_tpot(cls, f, tpot)
        if i % 256 == 255:
            model.train()
    model.train()
    for cls, law in ((H100, fast), (A100, slow)):
        ttft_mape, tpot_mape = held_out_mape(model, law, rng, cls=cls)
        assert ttft_mape < TTFT_BOUND and tpot_mape < TPOT_BOUND, (cls, ttft_mape, tpot_mape)
    f = LatencyFeatures(kv_cache_usage=0.5, running_requests=20, waiting_requests=1, input_tokens=2_000,
                        prefill_tokens_in_flight=800, decode_tokens_in_flight=15_000)
    for target in ("ttft", "tpot"):
        ratio = getattr(model, f"predict_{target}")(A100, f) / getattr(model, f"predict_{target}")(H100, f)
        assert 2.2 * 0.85 < ratio < 2.2 * 1.15, (target, ratio)
    assert model.classes() == sorted([H100, A100])
    # an unseen class falls back to the pool-wide model, which averages the two
    pooled = model.predict_ttft("unknown-gpu", f)
    assert model.predict_ttft(H100, f) < pooled < model.predict_ttft(A100, f)
    assert model.samples(POOL, Target.TTFT) == 4_000


def test_pooling_fast_and_slow_hardware_fails_the_bound():
    model, rng = LatencyModel(max_classes=0), random.Random(11)  # no class models: everything pooled
    fast, slow = VllmLaw(speed=1.0), VllmLaw(speed=2.2)
    for _ in range(2_000):
        for cls, law in ((H100, fast), (A100, slow)):
            f, ttft, tpot = law.sample(rng)
            model.observe_ttft(cls, f, ttft)
    model.train()
    assert model.classes() == []
    ttft_fast, _ = held_out_mape(model, fast, rng, cls=H100)
    assert ttft_fast > TTFT_BOUND, ttft_fast


def test_forgetting_follows_a_server_that_slows_down():
    rng_a, rng_b = random.Random(5), random.Random(5)
    forgetting, frozen = LatencyModel(), LatencyModel(forgetting=1.0)
    for model, rng in ((forgetting, rng_a), (frozen, rng_b)):
        feed(model, VllmLaw(speed=1.0), rng, 5_000)
        feed(model, VllmLaw(speed=2.0), rng, 3_000)
    now = VllmLaw(speed=2.0)
    assert held_out_mape(forgetting, now, random.Random(1))[0] < TTFT_BOUND
    assert held_out_mape(frozen, now, random.Random(1))[0] > TTFT_BOUND + 0.1


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_a_quantile_objective_covers_that_fraction_of_fresh_latencies(quantile):
    model, law, rng = LatencyModel(quantile=quantile), VllmLaw(), random.Random(13)
    feed(model, law, rng, 3_000)
    test = [law.sample(rng) for _ in range(2_000)]
    for target, col in (("ttft", 1), ("tpot", 2)):
        predict = getattr(model, f"predict_{target}")
        covered = sum(1 for s in test if s[col] <= predict(H100, s[0])) / len(test)
        assert abs(covered - quantile) < 0.05, (target, covered)
    # the error it exports reports the same coverage
    assert abs(model.errors()[(H100, Target.TTFT)].coverage - quantile) < 0.06


def test_a_p90_prediction_is_the_typical_one_plus_a_residual_quantile_calibrated_per_magnitude():
    """Noise that is wide on short latencies (sigma 0.35 under 150 ms) and narrow on long ones
    (0.05): one quantile of the residuals over all would over-cover the long requests and
    under-cover the short ones; calibrated per octave of the typical prediction, each group is
    covered ~90 % and its MAPE is near what a perfect p90 predictor of that noise scores."""
    law, rng = VllmLaw(), random.Random(21)
    sigma = lambda mean: 0.35 if mean < 150.0 else 0.05  # noqa: E731

    def sample():
        f = law.state(rng)
        mean = law.ttft_mean(f)
        return f, mean, mean * math.exp(rng.gauss(0.0, sigma(mean)))

    model, typical = LatencyModel(quantile=0.9), LatencyModel()
    for i in range(4_000):
        f, _, ttft = sample()
        model.observe_ttft(H100, f, ttft)
        typical.observe_ttft(H100, f, ttft)
        if (i + 1) % 256 == 0:
            model.train()
            typical.train()
    model.train()
    typical.train()
    groups: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for _ in range(3_000):
        f, mean, ttft = sample()
        groups[mean < 150.0].append((model.predict_ttft(H100, f), typical.predict_ttft(H100, f), ttft))
    for short, rows in groups.items():
        assert len(rows) > 300, (short, len(rows))
        covered = sum(1 for p90, _, y in rows if y <= p90) / len(rows)
        assert abs(covered - 0.9) < 0.05, (short, covered)
        assert all(p90 >= t for p90, t, _ in rows)  # the typical prediction plus a positive residual quantile
        mape = sum(abs(p90 - y) / y for p90, _, y in rows) / len(rows)
        floor = noise_floor_mape(0.35 if short else 0.05, 0.9)
        assert mape < floor + 0.05, (short, mape, floor)
    assert abs(model.errors()[(H100, Target.TTFT)].coverage - 0.9) < 0.05


def test_the_objective_comes_from_the_reference_servers_environment():
    assert objective_from_env({}) is None  # unset: mean, what both reference charts deploy
    assert objective_from_env({"LATENCY_QUANTILE_ALPHA": "0.8"}) is None  # alpha alone: still mean
    assert objective_from_env({"LATENCY_OBJECTIVE_TYPE": "quantile"}) == 0.9  # the servers' code default alpha
    assert objective_from_env({"LATENCY_OBJECTIVE_TYPE": "mean", "LATENCY_QUANTILE_ALPHA": "0.5"}) is None
    assert objective_from_env({"LATENCY_OBJECTIVE_TYPE": "quantile", "LATENCY_QUANTILE_ALPHA": "0.75"}) == 0.75
    for env, message in (({"LATENCY_OBJECTIVE_TYPE": "median"}, "LATENCY_OBJECTIVE_TYPE: must be 'quantile' or"),
                         ({"LATENCY_QUANTILE_ALPHA": "1"}, "LATENCY_QUANTILE_ALPHA: must be a number in"),
                         ({"LATENCY_QUANTILE_ALPHA": "nan"}, "LATENCY_QUANTILE_ALPHA"),
                         ({"LATENCY_QUANTILE_ALPHA": "high"}, "LATENCY_QUANTILE_ALPHA")):
        with pytest.raises(ValueError, match=message):
            objective_from_env(env)


def test_the_default_objective_is_not_a_high_quantile():
    model, law, rng = LatencyModel(), VllmLaw(), random.Random(13)
    feed(model, law, rng, 3_000)
    test = [law.sample(rng) for _ in range(2_000)]
    covered = sum(1 for f, ttft, _ in test if ttft <= model.predict_ttft(H100, f)) / len(test)
    assert 0.3 < covered < 0.7, covered
    with pytest.raises(ValueError):
        LatencyModel(quantile=1.0)


@pytest.mark.parametrize("relative", [True, False])
def test_batch_accumulation_equals_one_sample_at_a_time(relative):
    law, rng = VllmLaw(), random.Random(17)
    samples = [law.sample(rng) for _ in range(500)]
    xs, ys = [ttft_basis(f) for f, _, _ in samples], [t for _, t, _ in samples]
    one, batch = ForgettingRidge(len(xs[0]), relative=relative), ForgettingRidge(len(xs[0]), relative=relative)
    for x, y in zip(xs, ys, strict=True):
        one.add(x, y)
    batch.add_batch(xs[:123], ys[:123])
    batch.add_batch(xs[123:], ys[123:])
    one.solve()
    batch.solve()
    assert batch.samples == one.samples == 500
    assert batch.weights == pytest.approx(one.weights, rel=1e-6)


def test_same_seed_same_model():
    def build():
        model = LatencyModel()
        feed(model, VllmLaw(), random.Random(42), 1_000)
        return model
    a, b = build(), build()
    for target in Target:
        assert a.coefficients(H100, target) == b.coefficients(H100, target)
    assert a.errors() == b.errors()
    f = VllmLaw().state(random.Random(0))
    assert a.predict(H100, f) == b.predict(H100, f)


HOSTILE = [math.nan, math.inf, -math.inf, -1.0, 1e300, 10**400, None, "7", b"1", [1]]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LatencyFeatures)])
@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_hostile_feature_values_are_ignored_never_raise(field, value):
    model, rng = LatencyModel(), random.Random(2)
    feed(model, VllmLaw(), rng, 300)
    before = model.coefficients(H100, Target.TTFT)
    bad = dataclasses.replace(LatencyFeatures(input_tokens=100), **{field: value})
    assert model.observe_ttft(H100, bad, 50.0) is False
    assert model.observe_tpot(H100, bad, 10.0) is False
    assert model.predict_ttft(H100, bad) is None and model.predict(H100, bad).tpot_ms is None
    assert model.rejected == 2
    model.train()
    assert model.coefficients(H100, Target.TTFT) == before
    assert model.predict_ttft(H100, LatencyFeatures(input_tokens=100)) is not None


@pytest.mark.parametrize("latency", [math.nan, math.inf, -5.0, 0.0, 1e12, None, "12", False])
def test_hostile_latencies_are_ignored(latency):
    model = LatencyModel()
    assert model.observe_ttft(H100, LatencyFeatures(), latency) is False
    assert model.observe_tpot(H100, LatencyFeatures(), latency) is False
    assert model.pending == 0 and model.rejected == 2
    assert model.observe_ttft(H100, "not features", 10.0) is False  # type: ignore[arg-type]
    assert model.observe_ttft(None, LatencyFeatures(), 10.0) is False  # type: ignore[arg-type]
    assert model.observe_ttft(["h100"], LatencyFeatures(), 10.0) is False  # type: ignore[arg-type]


def test_a_hostile_class_name_predicts_from_the_pool():
    model = LatencyModel()
    feed(model, VllmLaw(), random.Random(2), 300)
    f = LatencyFeatures(input_tokens=100)
    pooled = model.predict_ttft("never-seen", f)
    assert pooled is not None
    assert model.predict_ttft(["h100"], f) == pooled  # type: ignore[arg-type]
    assert model.predict({"x": 1}, f).ttft_ms == pooled  # type: ignore[arg-type]


def test_degenerate_but_valid_samples_do_not_break_the_solve():
    model = LatencyModel(min_samples=4)
    for _ in range(100):  # all-zero features: the normal equations are singular but for the bias
        model.observe_ttft(H100, LatencyFeatures(), 25.0)
    model.train()
    assert model.predict_ttft(H100, LatencyFeatures()) == pytest.approx(25.0, rel=1e-3)
    for v in (1e-9, 3_000_000.0):  # extreme but legal latencies and the largest legal features
        model.observe_ttft(H100, LatencyFeatures(kv_cache_usage=1.0, input_tokens=1e8, waiting_requests=1e5), v)
    model.train()
    p = model.predict_ttft(H100, LatencyFeatures(kv_cache_usage=1.0, input_tokens=1e8))
    assert p is not None and math.isfinite(p) and p >= 0.0


def deep_size(obj: object) -> int:
    """Bytes reachable from obj (types and modules excluded: shared, not the model's)."""
    seen, stack, total = set(), [obj], 0
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        stack.extend(gc.get_referents(o))
    return total


@pytest.mark.slow
def test_memory_stays_bounded_over_a_million_samples():
    # 1,000 class names, at most max_classes kept; few enough that their error windows fill
    model, rng = LatencyModel(pending_max=1_024, max_classes=4), random.Random(9)
    law = VllmLaw()
    states = [law.sample(rng) for _ in range(64)]
    names = [f"gpu-{i}" for i in range(1_000)]
    sizes = []
    for i in range(1_000_000):
        f, ttft, _ = states[i & 63]
        model.observe_ttft(names[i % 1_000], f, ttft)
        if i % 100_000 == 99_999:
            sizes.append(deep_size(model))  # the queue is full here: the high-water mark
            model.train()
    assert model.pending == 0 and model.dropped == 1_000_000 - 10 * 1_024
    assert len(model.classes()) == model.max_classes
    assert all(e.samples == ERROR_WINDOW for e in model.errors().values())
    # once the class models exist and their error windows are full, memory stops growing
    assert max(sizes[5:]) <= sizes[5] * 1.01, sizes


def test_endpoint_class_from_accelerator_labels():
    assert endpoint_class({"nvidia.com/gpu.product": H100, "cloud.google.com/gke-accelerator": "x"}) == H100
    assert endpoint_class({"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}) == "nvidia-a100-80gb"
    assert endpoint_class({"app": "vllm"}) == DEFAULT_CLASS == endpoint_class(None)
    assert endpoint_class({"hw": "fast"}, keys=("hw",)) == "fast"
    assert len(endpoint_class({"nvidia.com/gpu.product": "x" * 10_000})) == 128


def test_trainer_trains_by_count_and_by_time():
    now = [0.0]
    model = LatencyModel()
    trainer = Trainer(model, every_samples=10, interval_s=5.0, clock=lambda: now[0])
    assert trainer.maybe_train() is None  # nothing waiting
    for _ in range(3):
        model.observe_ttft(H100, LatencyFeatures(), 10.0)
    assert trainer.maybe_train() is None  # 3 < 10 and not yet 5 s
    now[0] = 5.0
    assert trainer.maybe_train().samples == 3
    for _ in range(10):
        model.observe_ttft(H100, LatencyFeatures(), 10.0)
    assert trainer.maybe_train().samples == 10 and trainer.runs == 2


def test_trainer_learns_every_waiting_sample_in_one_fit():
    model = LatencyModel()
    for _ in range(300):
        model.observe_ttft(H100, LatencyFeatures(input_tokens=100), 30.0)
    report = Trainer(model, every_samples=100).maybe_train()
    assert report.samples == 300 and model.pending == 0
    assert model.predict_ttft(H100, LatencyFeatures(input_tokens=100)) == pytest.approx(30.0, rel=1e-3)
