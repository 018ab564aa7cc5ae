"""A client of the reference's latency predictor sidecars (training server, prediction
servers; their HTTP API and JSON shapes in sidecar_json.py), for a picker deployed by the
reference's chart variant that runs them beside it.

Configured as the reference's client is, from the environment (its ConfigFromEnv): the
sidecars are used only when TRAINING_SERVER_URL or PREDICTION_SERVER_URL is set; then
LATENCY_MAX_SAMPLE_SIZE (1000) bounds the samples waiting for a flush, LATENCY_FLUSH_INTERVAL_SEC
(1) paces the flushes, LATENCY_HTTP_TIMEOUT_SEC (10) bounds a training call,
LATENCY_MAX_BULK_SIZE (100) a bulk prediction.

Nothing here runs on the hot path: all I/O is in one daemon thread with its own event loop.
`lookup` answers from a bounded cache of the prediction servers' answers for recently seen
feature vectors (rounded, so similar requests share an answer) and otherwise returns None at
once, asking for that vector in the background; the producer then uses its in-process model.
A sidecar that is down or slow costs only those background calls (each bounded by
PREDICT_TIMEOUT_S), never a request's latency."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from epp.httpbody import read_bounded

from .features import LatencyFeatures
from .model import LatencyPrediction
from .sidecar_json import prediction_from_json, prediction_request, training_entry

log = logging.getLogger(__name__)

CACHE_SIZE = 4_096           # feature vectors with a sidecar prediction kept
WANTED_MAX = 1_024           # feature vectors waiting to be asked for
PREDICTION_TTL_S = 2.0       # a cached sidecar prediction is used this long
PREDICT_TIMEOUT_S = 0.5      # a bulk prediction call's deadline
MAX_PREDICT_RESPONSE_BYTES = 4 << 20  # a bulk prediction answer larger than this is refused
PREDICT_POLL_S = 0.01        # how often the background loop looks for vectors to ask for
MAX_URLS = 16
# the reference client's tuning of its per-request dispatch, which this background client does not have
UNUSED_ENV = ("LATENCY_MAX_CONCURRENT_DISPATCHES", "LATENCY_COALESCE_WINDOW_MS", "LATENCY_MAX_COALESCED_ROWS",
              "LATENCY_METRICS_INTERVAL_SEC", "LATENCY_USE_NATIVE_XGBOOST")


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number; %s is used", name, raw[:32], default)
        return default
    return value if math.isfinite(value) and value >= minimum else default


def _urls(raw: str) -> tuple[str, ...]:
    return tuple(u.strip().rstrip("/") for u in raw.split(",") if u.strip().startswith(("http://", "https://")))[
        :MAX_URLS]


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    training_url: str = ""
    prediction_urls: tuple[str, ...] = ()
    max_sample_size: int = 1000
    flush_interval_s: float = 1.0
    http_timeout_s: float = 10.0
    max_bulk_size: int = 100

    @classmethod
    def from_env(cls) -> SidecarConfig | None:
        training, prediction = os.environ.get("TRAINING_SERVER_URL", ""), os.environ.get("PREDICTION_SERVER_URL", "")
        if not training and not prediction:
            return None
        unused = [n for n in UNUSED_ENV if os.environ.get(n)]
        if unused:
            log.info("latency predictor sidecars: %s not used by this client (its calls are few and batched in "
                     "the background)", ", ".join(unused))
        return cls(training_url=(_urls(training) or ("",))[0], prediction_urls=_urls(prediction),
                   max_sample_size=int(_env_number("LATENCY_MAX_SAMPLE_SIZE", 1000, 1)),
                   flush_interval_s=_env_number("LATENCY_FLUSH_INTERVAL_SEC", 1.0, 0.01),
                   http_timeout_s=_env_number("LATENCY_HTTP_TIMEOUT_SEC", 10.0, 0.01),
                   max_bulk_size=int(_env_number("LATENCY_MAX_BULK_SIZE", 100, 1)))


def _bucket(x: float) -> int:
    return int(math.log1p(max(x, 0.0)) / math.log(1.1))


def cache_key(f: LatencyFeatures) -> tuple[int, ...]:
    """Features rounded so that requests alike share a sidecar answer: KV and prefix match to
    5 %, counts exact, token counts to ~10 % (log buckets)."""
    return (round(f.kv_cache_usage * 20), int(f.waiting_requests), int(f.running_requests), _bucket(f.input_tokens),
            round(f.prefix_match * 20), _bucket(f.prefill_tokens_in_flight), _bucket(f.decode_tokens_in_flight))


@dataclass(slots=True)
class SidecarStatus:
    samples_sent: int = 0
    samples_dropped: int = 0
    training_failures: int = 0
    predictions: int = 0
    prediction_failures: int = 0
    cache_hits: int = 0
    last_error: str = ""


class SidecarClient:
    def __init__(self, config: SidecarConfig, *, clock: Any = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.status = SidecarStatus()
        self._samples: deque[dict[str, Any]] = deque(maxlen=config.max_sample_size)
        self._cache: OrderedDict[tuple[int, ...], tuple[float, LatencyPrediction]] = OrderedDict()
        self._wanted: OrderedDict[tuple[int, ...], LatencyFeatures] = OrderedDict()
        self._next_url = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-predictor-sidecars", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ hot path
    def lookup(self, features: LatencyFeatures) -> LatencyPrediction | None:
        if not self.config.prediction_urls:
            return None
        key = cache_key(features)
        hit = self._cache.get(key)
        if hit is not None and self.clock() - hit[0] <= PREDICTION_TTL_S:
            self.status.cache_hits += 1
            return hit[1]
        if key not in self._wanted and len(self._wanted) < WANTED_MAX:
            self._wanted[key] = features
        return None

    def add_sample(self, features: LatencyFeatures, ttft_ms: float, tpot_ms: float, pod_type: str = "") -> None:
        if not self.config.training_url:
            return
        try:
            entry = training_entry(features, ttft_ms=ttft_ms, tpot_ms=tpot_ms, timestamp=datetime.now(UTC),
                                   pod_type=pod_type)
        except ValueError:
            return
        if len(self._samples) == self._samples.maxlen:
            self.status.samples_dropped += 1
        self._samples.append(entry)

    # ------------------------------------------------------------------ background
    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:  # noqa: BLE001 - the in-process model keeps answering
            log.exception("latency predictor sidecar client stopped")

    async def _main(self) -> None:
        import aiohttp  # the serving extra; only a picker configured for the sidecars needs it

        async with aiohttp.ClientSession() as session:
            last_flush = self.clock()
            while not self._stop.is_set():
                if self._wanted:
                    await self._predict(session, aiohttp)
                if self._samples and self.clock() - last_flush >= self.config.flush_interval_s:
                    last_flush = self.clock()
                    await self._flush(session, aiohttp)
                await asyncio.sleep(PREDICT_POLL_S)

    async def _flush(self, session: Any, aiohttp: Any) -> None:
        entries = []
        while self._samples and len(entries) < self.config.max_sample_size:
            entries.append(self._samples.popleft())
        url = f"{self.config.training_url}/add_training_data_bulk"
        try:
            async with session.post(url, json={"entries": entries},
                                    timeout=aiohttp.ClientTimeout(total=self.config.http_timeout_s)) as r:
                if r.status >= 300:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            self.status.samples_sent += len(entries)
        except Exception as e:  # noqa: BLE001 - a sidecar that is down loses these samples, as the reference's does
            self.status.training_failures += 1
            self.status.last_error = f"training: {e!r}"[:200]

    async def _predict(self, session: Any, aiohttp: Any) -> None:
        batch = []
        while self._wanted and len(batch) < self.config.max_bulk_size:
            batch.append(self._wanted.popitem(last=False))
        urls = self.config.prediction_urls
        url = f"{urls[self._next_url % len(urls)]}/predict/bulk/strict"
        self._next_url += 1
        try:
            async with session.post(url, json={"requests": [prediction_request(f) for _, f in batch]},
                                    timeout=aiohttp.ClientTimeout(total=PREDICT_TIMEOUT_S)) as r:
                if r.status >= 300:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
                raw = await read_bounded(r.content, MAX_PREDICT_RESPONSE_BYTES)
            if raw is None:
                raise RuntimeError(f"{url}: answer larger than {MAX_PREDICT_RESPONSE_BYTES} bytes")
            body = json.loads(raw)  # as aiohttp's json() decodes it
            predictions = body.get("predictions") if isinstance(body, dict) else None
            if not isinstance(predictions, list) or len(predictions) != len(batch):
                raise RuntimeError(f"{url}: expected {len(batch)} predictions")
        except Exception as e:  # noqa: BLE001 - the in-process model answers instead
            self.status.prediction_failures += 1
            self.status.last_error = f"prediction: {e!r}"[:200]
            return
        now = self.clock()
        for (key, _), obj in zip(batch, predictions, strict=True):
            pred = prediction_from_json(obj)
            if pred is None:
                continue
            self._cache[key] = (now, pred)
            self._cache.move_to_end(key)
            self.status.predictions += 1
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


__all__ = ["CACHE_SIZE", "PREDICTION_TTL_S", "PREDICT_TIMEOUT_S", "SidecarClient", "SidecarConfig", "cache_key",
           "SidecarStatus"]
