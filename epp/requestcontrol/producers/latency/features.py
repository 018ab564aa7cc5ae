"""Features of one (request, endpoint) pair for the latency model, from plain values.

The raw inputs are the reference's (GIE v1.5 latencypredictor TrainingEntry /
PredictionRequest): KV-cache utilisation (0..1), waiting and running requests, the
request's input tokens, its prefix-cache match (0..1), the endpoint's prefill and decode
tokens in flight, and tokens generated so far. The reference hands trees these columns
plus `effective_input_tokens = input * (1 - prefix)` and an `is_queued` flag; a linear
model needs the nonlinearity spelled out instead, so each target has a small fixed basis
(a tuple of floats): its work terms (uncached prefill tokens, queue, tokens in flight),
each alone and multiplied by hinge terms max(0, kv - knot) at fixed KV-utilisation knots,
a piecewise-linear stand-in for the slowdown past the KV-pressure knee (preemption).

Hostile input is normal input: `clean` returns None for a non-finite or out-of-range
value (never raises), so a sample can be dropped and a prediction skipped."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Largest plausible raw values; anything above is a broken scrape or a hostile client.
MAX_REQUESTS = 100_000          # waiting or running requests on one endpoint
MAX_TOKENS = 100_000_000        # input tokens of one request, or tokens in flight
# KV-utilisation knots of the hinge terms max(0, kv - knot): where the knee may sit.
KV_KNOTS = (0.7, 0.9)
# Label keys that name an endpoint's accelerator (NVIDIA GPU feature discovery, GKE), first match wins.
DEFAULT_CLASS_LABELS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator")
DEFAULT_CLASS = "default"
MAX_CLASS_CHARS = 128


@dataclass(frozen=True, slots=True)
class LatencyFeatures:
    """One endpoint's metrics snapshot and the request's facts, as plain numbers."""
    kv_cache_usage: float = 0.0          # fraction 0..1 (the reference's kv_cache_percentage)
    waiting_requests: float = 0.0
    running_requests: float = 0.0
    input_tokens: float = 0.0
    prefix_match: float = 0.0            # fraction 0..1 of the prompt already cached there
    prefill_tokens_in_flight: float = 0.0
    decode_tokens_in_flight: float = 0.0
    tokens_generated: float = 0.0


def clean(features: object) -> LatencyFeatures | None:
    """The features if every value is a finite number within its range, else None (NaN fails
    every comparison; a string or None raises TypeError, caught)."""
    if type(features) is not LatencyFeatures:
        return None
    f = features
    try:
        ok = (0.0 <= f.kv_cache_usage <= 1.0 and 0.0 <= f.prefix_match <= 1.0
              and 0.0 <= f.waiting_requests <= MAX_REQUESTS and 0.0 <= f.running_requests <= MAX_REQUESTS
              and 0.0 <= f.input_tokens <= MAX_TOKENS and 0.0 <= f.prefill_tokens_in_flight <= MAX_TOKENS
              and 0.0 <= f.decode_tokens_in_flight <= MAX_TOKENS and 0.0 <= f.tokens_generated <= MAX_TOKENS)
    except TypeError:
        return None
    return f if ok else None


_TTFT_WORK = ("bias", "uncached_input_tokens", "waiting_requests", "prefill_tokens_in_flight", "running_requests")
_TPOT_WORK = ("bias", "running_requests", "decode_tokens_in_flight", "context_tokens")


def _with_knee(work: tuple[str, ...]) -> tuple[str, ...]:
    return (*work, "kv_cache_usage", *(f"{w}_x_kv_over_{k}" for k in KV_KNOTS for w in work))


TTFT_BASIS = _with_knee(_TTFT_WORK)
TPOT_BASIS = _with_knee(_TPOT_WORK)
_K1, _K2 = KV_KNOTS


def ttft_basis(f: LatencyFeatures) -> tuple[float, ...]:
    """TTFT ~ (queueing + uncached prefill tokens * per-token cost) * (1 + KV-pressure knee):
    every work term, alone and times each hinge max(0, kv - knot)."""
    kv = f.kv_cache_usage
    work = (1.0, f.input_tokens * (1.0 - f.prefix_match), f.waiting_requests, f.prefill_tokens_in_flight,
            f.running_requests)
    h1 = kv - _K1 if kv > _K1 else 0.0
    h2 = kv - _K2 if kv > _K2 else 0.0
    return (*work, kv, *[w * h1 for w in work], *[w * h2 for w in work])


def tpot_basis(f: LatencyFeatures) -> tuple[float, ...]:
    """TPOT ~ (base + per-running-sequence cost + attention over the tokens in flight and the
    request's own context) * (1 + KV-pressure knee)."""
    kv = f.kv_cache_usage
    work = (1.0, f.running_requests, f.decode_tokens_in_flight, f.input_tokens + f.tokens_generated)
    h1 = kv - _K1 if kv > _K1 else 0.0
    h2 = kv - _K2 if kv > _K2 else 0.0
    return (*work, kv, *[w * h1 for w in work], *[w * h2 for w in work])


def endpoint_class(labels: Mapping[str, str] | None, keys: Sequence[str] = DEFAULT_CLASS_LABELS) -> str:
    """The endpoint's hardware class: the first accelerator label present, else DEFAULT_CLASS."""
    for key in keys:
        value = (labels or {}).get(key)
        if isinstance(value, str) and value:
            return value[:MAX_CLASS_CHARS]
    return DEFAULT_CLASS


def finite_positive(x: object, limit: float) -> bool:
    """True for a finite number in (0, limit]: a latency worth learning from."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 < x <= limit and not math.isnan(x)
