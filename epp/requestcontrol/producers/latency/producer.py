"""predicted-latency-producer (the reference's requestcontrol/dataproducer/predictedlatency):
predicts each candidate endpoint's TTFT and TPOT for the request and publishes them with the
headroom against the request's SLOs (LATENCY_PREDICTIONS) for latency-scorer,
slo-headroom-tier-filter, latency-slo-admitter and prefix-cache-affinity-filter
(ttftSource latencyPredictor).

Where the reference asks its predictor sidecars, this producer predicts in process
(model.py: microseconds per endpoint, no I/O) and learns from the latencies it observes on
every response, in a background thread (trainer.py). When the environment names the
reference's sidecars (TRAINING_SERVER_URL / PREDICTION_SERVER_URL, as its charts' latency-
predictor variant sets them) it also feeds them and uses their predictions when they answer
in time (sidecar.py); the in-process model answers otherwise.

As the reference:
- headroom = SLO x ... - predicted; TTFT valid when predicted < SLO (no SLO: 0, so headroom
  = -predicted and never valid); TPOT only in streamingMode, against min(request's TPOT SLO,
  the tightest TPOT SLO of the requests running there when > 0) x sloBufferFactor; without
  streamingMode, or on an endpoint whose endpointRoleLabel says prefill, TPOT is neutral
  (valid, headroom 0);
- trained targets: streamingMode: TTFT from the request to its first response chunk, learnt
  when that chunk arrives (a request that then fails still teaches its TTFT), TPOT =
  (end - first chunk) / (generated tokens - 1); otherwise TTFT is the whole request's latency
  and TPOT is not trained;
- features: the endpoint's KV utilisation and waiting queue, the requests and prefill tokens
  this picker has in flight there (inflight-load-producer; else the scraped running count),
  the prompt's tokens (token-producer) and the prefix match (approx-prefix-cache-producer),
  all as at dispatch; the endpoint's hardware class (accelerator label) picks its model;
- objective: the environment variables of the reference's predictor servers. Unset, it is
  "mean" (the typical latency), what both reference charts deploy: they set
  LATENCY_OBJECTIVE_TYPE "mean" on the predictor sidecars this model replaces, not on the
  picker's container. LATENCY_OBJECTIVE_TYPE=quantile in the picker's environment predicts the
  LATENCY_QUANTILE_ALPHA (default 0.9, the servers' code default) quantile: the typical
  prediction times a residual quantile calibrated online (model.py). A bad value refuses to
  start.

Deviation: the reference sends decode_tokens_in_flight as 0 ("only accurate in pure streaming
mode"); here it is the prompt tokens of the requests this picker has dispatched to the
endpoint whose first response chunk has arrived and that have not completed (requests in
their decode phase, holding their context in the KV cache), so TPOT can learn from it.

Virtual time (the cluster simulation): the clock is the handle's; set `background_training
= False` before the first request and training runs inline at each completion when due
(Trainer.maybe_train with the same clock), with no thread."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle, SchedulingResult
from epp.framework.datakeys import (
    APPROX_PREFIX_PRODUCER,
    INFLIGHT_LOAD,
    INFLIGHT_LOAD_PRODUCER,
    LATENCY_PREDICTIONS,
    PREFIX_MATCH_INFO,
    TOKENIZED_PROMPT,
    TOKENS_CONSUMER,
    LatencyPredictionInfo,
    LatencyPredictions,
    ProducerParam,
)
from epp.framework.metrics import BoundedLabels
from epp.framework.plugins import ConfiguredPlugin
from epp.framework.types import ResponseInfo
from epp.units import duration_value

from .features import LatencyFeatures, endpoint_class
from .metrics import ProducerMetrics
from .model import POOL, LatencyModel, Target, objective_from_env
from .sidecar import SidecarClient, SidecarConfig
from .trainer import Trainer

log = logging.getLogger(__name__)

TYPE = "predicted-latency-producer"
MAX_TRACKED = 65_536            # requests between dispatch and completion; the oldest are forgotten
MAX_MODEL_LABELS = 32           # model names as metric labels; later ones count under "other"
TRAIN_POLL_S = 0.05
CLOSE_TIMEOUT_S = 5.0           # close() waits this long at most for a fit under way
ROWS_TTL_S = 1.0                # `epp endpoints` reuses the error summary this long


@dataclass(slots=True)
class PredictedLatencyParams:
    samplingMean: float = 1000.0                 # deprecated in the reference, ignored
    maxDecodeTokenSamplesForPrediction: int = 0  # deprecated in the reference, ignored
    sloBufferFactor: float = 1.0
    contextTTL: str | float = "5m"
    streamingMode: bool = False
    endpointRoleLabel: str = ""
    predictInProduce: bool = True
    predictInPrepareData: bool | None = None     # GIE v1.5's name of predictInProduce
    prefixMatchInfoProducerName: str = ""
    inFlightLoadProducerName: str = ""
    useEncoderCacheFeatures: bool = False
    encoderCacheMatchInfoProducerName: str = ""

    def validate(self) -> None:
        if not self.sloBufferFactor > 0:
            raise ValueError(f"sloBufferFactor: must be > 0, got {self.sloBufferFactor}")
        if duration_value(self.contextTTL, "contextTTL", ValueError) <= 0:
            raise ValueError(f"contextTTL: must be > 0, got {self.contextTTL!r}")
        if self.useEncoderCacheFeatures:
            raise ValueError("useEncoderCacheFeatures: needs the multimodal encoder-cache producer "
                             "(mm-embeddings-cache-producer, issue 12), not built yet")


@dataclass(slots=True)
class _Candidate:
    """An endpoint's features and prediction for one request, as at dispatch."""
    endpoint_class: str
    features: LatencyFeatures
    ttft_ms: float | None
    tpot_ms: float | None


@dataclass(slots=True)
class _Pending:
    """What PrepareData learnt about a request, kept in the cycle until PreRequest commits it."""
    candidates: dict[Endpoint, _Candidate]
    started: float
    predict_seconds: float  # spent predicting (recorded at dispatch: an explain dry run records nothing)


@dataclass(slots=True)
class _Tracked:
    """A dispatched request until it completes."""
    endpoint: Endpoint
    candidate: _Candidate
    started: float
    tpot_slo_ms: float
    ttft_slo_ms: float
    first_chunk: float = 0.0
    ttft_ms: float = 0.0       # streamingMode: learnt at the first chunk
    decoding: bool = False     # its first chunk arrived: it counts in its endpoint's decode tokens in flight


class _Running:
    """Per endpoint, the TPOT SLOs of the requests dispatched there and not completed, sorted
    (the reference's running-request priority queue: its size and its minimum)."""
    __slots__ = ("_slos",)

    def __init__(self) -> None:
        self._slos: dict[Endpoint, list[float]] = {}

    def add(self, endpoint: Endpoint, tpot_slo: float) -> None:
        bisect.insort(self._slos.setdefault(endpoint, []), tpot_slo)

    def remove(self, endpoint: Endpoint, tpot_slo: float) -> None:
        slos = self._slos.get(endpoint)
        if slos:
            i = bisect.bisect_left(slos, tpot_slo)
            if i < len(slos) and slos[i] == tpot_slo:
                slos.pop(i)
            if not slos:
                del self._slos[endpoint]

    def count(self, endpoint: Endpoint) -> int:
        return len(self._slos.get(endpoint, ()))

    def min_slo(self, endpoint: Endpoint) -> float:
        slos = self._slos.get(endpoint)
        return slos[0] if slos else 0.0

    def forget(self, endpoints: Iterable[Endpoint]) -> None:
        for e in endpoints:
            self._slos.pop(e, None)


class PredictedLatencyProducer(ConfiguredPlugin[PredictedLatencyParams]):
    type_name = TYPE
    Params = PredictedLatencyParams
    consumes = (ProducerParam("prefixMatchInfoProducerName", APPROX_PREFIX_PRODUCER, required=True),
                ProducerParam("inFlightLoadProducerName", INFLIGHT_LOAD_PRODUCER, required=True),
                TOKENS_CONSUMER)

    def configure(self, p: PredictedLatencyParams, handle: PluginHandle) -> None:
        self.params = p
        if p.samplingMean != 1000.0 or p.maxDecodeTokenSamplesForPrediction != 0:
            log.info("%s: deprecated: samplingMean and maxDecodeTokenSamplesForPrediction are ignored (as in the "
                     "reference, which removed mid-stream TPOT predictions)", self.name)
        self.buffer = p.sloBufferFactor
        self.streaming = p.streamingMode
        self.role_label = p.endpointRoleLabel
        self.predict_enabled = p.predictInProduce if p.predictInPrepareData is None else p.predictInPrepareData
        self.context_ttl = duration_value(p.contextTTL, "contextTTL", ValueError)
        self.clock = handle.clock
        self.model = LatencyModel(quantile=objective_from_env())
        self.trainer = Trainer(self.model, clock=handle.clock)
        self.background_training = True
        self._train_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.sidecar_config = SidecarConfig.from_env()
        self.sidecar: SidecarClient | None = None  # started by start_background (the server)
        self.key = LATENCY_PREDICTIONS.of(self.name)
        self._prefix_key = PREFIX_MATCH_INFO.of(p.prefixMatchInfoProducerName or APPROX_PREFIX_PRODUCER)
        self._load_key = INFLIGHT_LOAD.of(p.inFlightLoadProducerName or INFLIGHT_LOAD_PRODUCER)
        self._pending_key = self.own_key("pending", _Pending)
        self._tracked: OrderedDict[str, _Tracked] = OrderedDict()
        self._last: dict[Endpoint, _Candidate] = {}  # per endpoint, the prediction of its last dispatch
        self._decode_tokens: dict[Endpoint, int] = {}  # per endpoint, prompt tokens of requests past their first chunk
        self._rows: tuple[float, list[dict[str, object]]] = (-ROWS_TTL_S, [])
        self.running = _Running()
        self.metrics = ProducerMetrics(handle.metrics, self.name, TYPE, self.error_rows)
        self._model_label = BoundedLabels(MAX_MODEL_LABELS)  # model names as metric label values

    # ------------------------------------------------------------------ PrepareData (hot path)
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest, endpoints: Sequence[Endpoint]) -> None:
        t0, p0 = self.clock(), time.perf_counter()
        candidates = self.features(cycle, request, endpoints)
        cycle.write(self._pending_key, _Pending(candidates, t0, time.perf_counter() - p0))
        if not self.predict_enabled:
            return
        out = LatencyPredictions(ttft_slo_ms=request.slo_ttft_ms, tpot_slo_ms=request.slo_tpot_ms)
        for e, c in candidates.items():
            info = self.judge(e, c, request)
            if info is not None:
                out.endpoints[e] = info
        cycle.write(self.key, out)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: request %s slo ttft=%s tpot=%s: %s", self.name, request.request_id, request.slo_ttft_ms,
                      request.slo_tpot_ms, {e.name: (round(i.ttft_ms, 1), round(i.tpot_ms, 2), i.valid)
                                            for e, i in out.endpoints.items()})

    def features(self, cycle: CycleState, request: InferenceRequest,
                 endpoints: Sequence[Endpoint]) -> dict[Endpoint, _Candidate]:
        prefix = cycle.read(self._prefix_key)
        load = cycle.read(self._load_key)
        tokens = cycle.read(TOKENIZED_PROMPT) or request.estimated_prompt_tokens
        sidecar = self.sidecar
        out = {}
        for e in endpoints:
            m = e.metrics
            running = load.requests.get(e, 0) if load is not None else m.running_requests_size
            f = LatencyFeatures(
                kv_cache_usage=min(max(m.kv_cache_usage_percent, 0.0), 1.0), waiting_requests=m.waiting_queue_size,
                running_requests=running, input_tokens=tokens, prefix_match=prefix.score(e) if prefix else 0.0,
                prefill_tokens_in_flight=load.tokens.get(e, 0) if load is not None else 0,
                decode_tokens_in_flight=self._decode_tokens.get(e, 0))
            cls = endpoint_class(e.labels)
            pred = sidecar.lookup(f) if sidecar is not None else None
            if pred is None:
                pred = self.model.predict(cls, f)
            out[e] = _Candidate(cls, f, pred.ttft_ms, pred.tpot_ms)
        return out

    def judge(self, e: Endpoint, c: _Candidate, request: InferenceRequest) -> LatencyPredictionInfo | None:
        """The prediction with its headroom and validity against the request's SLOs (the
        reference's validatePrediction); None when the model cannot predict yet."""
        if c.ttft_ms is None:
            return None
        ttft_slo = request.slo_ttft_ms
        neutral = not self.streaming or (self.role_label and e.labels.get(self.role_label) == "prefill")
        if neutral:
            tpot_ok, tpot_headroom = True, 0.0
        else:
            if c.tpot_ms is None:
                return None
            buffered = request.slo_tpot_ms * self.buffer
            pod_min = self.running.min_slo(e)
            if pod_min > 0:
                buffered = min(buffered, pod_min * self.buffer)
            tpot_ok, tpot_headroom = c.tpot_ms < buffered, buffered - c.tpot_ms
        return LatencyPredictionInfo(
            ttft_ms=c.ttft_ms, tpot_ms=c.tpot_ms or 0.0, ttft_headroom_ms=ttft_slo - c.ttft_ms,
            tpot_headroom_ms=tpot_headroom, ttft_valid=c.ttft_ms < ttft_slo, tpot_valid=tpot_ok,
            dispatched_requests=self.running.count(e))

    # ------------------------------------------------------------------ PreRequest
    def pre_request(self, cycle: CycleState, request: InferenceRequest, result: SchedulingResult) -> None:
        pending = cycle.read(self._pending_key)
        targets = result.targets
        if pending is None or not targets or not request.request_id:
            return
        target = targets[0]
        c = pending.candidates.get(target)
        if c is None:
            return
        self._forget(request.request_id)
        self._expire(pending.started)
        self._tracked[request.request_id] = _Tracked(target, c, pending.started, request.slo_tpot_ms,
                                                     request.slo_ttft_ms)
        self.running.add(target, request.slo_tpot_ms)
        self._last[target] = c
        if self.predict_enabled:
            model, target_model = self._model_label(request.incoming_model), self._model_label(request.target_model)
            for kind in ("ttft_prediction_duration", "tpot_prediction_duration"):
                self.metrics.observe(kind, model, target_model, pending.predict_seconds)

    def _expire(self, now: float) -> None:
        """Forget requests older than contextTTL (a response never seen) and beyond MAX_TRACKED."""
        tracked = self._tracked
        while tracked:
            rid, t = next(iter(tracked.items()))
            if len(tracked) < MAX_TRACKED and now - t.started <= self.context_ttl:
                break
            self._forget(rid)

    def _forget(self, rid: str) -> _Tracked | None:
        t = self._tracked.pop(rid, None)
        if t is not None:
            self.running.remove(t.endpoint, t.tpot_slo_ms)
            if t.decoding:
                self._add_decode_tokens(t, -1)
        return t

    def _add_decode_tokens(self, t: _Tracked, sign: int) -> None:
        e = t.endpoint
        left = self._decode_tokens.get(e, 0) + sign * int(t.candidate.features.input_tokens)
        if left > 0:
            self._decode_tokens[e] = left
        else:
            self._decode_tokens.pop(e, None)

    # ------------------------------------------------------------------ response hooks
    def response_streaming(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        t = self._tracked.get(request.request_id)
        if t is None or t.decoding:
            return
        t.first_chunk, t.decoding = self.clock(), True
        self._add_decode_tokens(t, +1)
        # streamingMode: TTFT is learnt at the first chunk, as the reference records it then (its
        # processFirstTokenForLatencyPrediction), not when the whole response has come
        if self.streaming and not response.end_of_stream and 200 <= response.status < 300:
            t.ttft_ms = (t.first_chunk - t.started) * 1000.0
            c = t.candidate
            self.model.observe_ttft(c.endpoint_class, c.features, t.ttft_ms)
            self._train()

    def response_complete(self, request: InferenceRequest, response: ResponseInfo, target: Endpoint | None) -> None:
        t = self._forget(request.request_id)
        if t is None or not 200 <= response.status < 300:
            return
        now = self.clock()
        c = t.candidate
        ttft_ms = tpot_ms = 0.0
        if self.streaming:
            if not t.ttft_ms:  # TTFT learnt at the first chunk (response_streaming); none came: nothing to learn
                return
            ttft_ms = t.ttft_ms
            generated = response.completion_tokens
            if generated >= 2 and now > t.first_chunk:
                tpot_ms = (now - t.first_chunk) * 1000.0 / (generated - 1)
                self.model.observe_tpot(c.endpoint_class, c.features, tpot_ms)
        else:  # the whole request's latency stands for TTFT, as the reference trains it
            ttft_ms = (now - t.started) * 1000.0
            self.model.observe_ttft(c.endpoint_class, c.features, ttft_ms)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: request %s on %s (%s): ttft %.1f ms, tpot %.2f ms, predicted %s; %s", self.name,
                      request.request_id, t.endpoint.name, c.endpoint_class, ttft_ms, tpot_ms, c.ttft_ms, c.features)
        if self.sidecar is not None:
            self.sidecar.add_sample(c.features, ttft_ms, tpot_ms, self._pod_type(t.endpoint))
        self._train()
        self._record(request, t, ttft_ms, tpot_ms)

    def _record(self, request: InferenceRequest, t: _Tracked, ttft_ms: float, tpot_ms: float) -> None:
        """The reference's end-of-request metrics: observed and predicted TTFT (and TPOT when
        measured), each observed one against its SLO when the request has one."""
        m, c = self.metrics, t.candidate
        model, target = self._model_label(request.incoming_model), self._model_label(request.target_model)
        for kind, actual, predicted, slo in (("ttft", ttft_ms, c.ttft_ms, t.ttft_slo_ms),
                                             ("tpot", tpot_ms, c.tpot_ms, t.tpot_slo_ms)):
            if actual <= 0:
                continue
            m.observe(kind, model, target, actual / 1000.0)
            if predicted is not None:
                m.observe(f"predicted_{kind}", model, target, predicted / 1000.0)
            if slo > 0:
                m.slo(kind, model, target, actual, slo)

    def _pod_type(self, e: Endpoint) -> str:
        role = e.labels.get(self.role_label, "") if self.role_label else ""
        return role if role in ("prefill", "decode") else ""

    # EndpointsChanged
    def endpoints_removed(self, endpoints: Sequence[Endpoint]) -> None:
        self.running.forget(endpoints)
        for e in endpoints:
            self._last.pop(e, None)
            self._decode_tokens.pop(e, None)

    # ------------------------------------------------------------------ training
    def _train(self) -> None:
        if not self.background_training:
            self.trainer.maybe_train()
            return
        if self._train_thread is None:
            self._train_thread = threading.Thread(target=self._train_loop, name=f"{self.name} trainer",
                                                  daemon=True)
            self._train_thread.start()

    def _train_loop(self) -> None:
        while not self._stop.wait(TRAIN_POLL_S):
            try:
                self.trainer.maybe_train()
            except Exception:  # noqa: BLE001 - a failed fit keeps the last weights; the next one may succeed
                log.exception("%s: training failed", self.name)

    async def start_background(self) -> None:
        if self.sidecar_config is not None and self.sidecar is None:
            self.sidecar = SidecarClient(self.sidecar_config)
            log.info("%s: predictor sidecars: training %s, prediction %s", self.name,
                     self.sidecar_config.training_url or "-", ",".join(self.sidecar_config.prediction_urls) or "-")

    async def stop_background(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the trainer thread (waiting for a fit under way) and the sidecar client."""
        self._stop.set()
        thread = self._train_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=CLOSE_TIMEOUT_S)
        if self.sidecar is not None:
            self.sidecar.close()

    # ------------------------------------------------------------------ introspection (`epp endpoints`, explain)
    def error_rows(self) -> list[dict[str, object]]:
        """Per (hardware class, target) the model has learnt from: the samples, and the recent
        prediction error once it predicts (mape, p90_abs_error_ms, coverage; absent before)."""
        errors = self.model.errors()
        rows = []
        for cls in (POOL, *self.model.classes()):
            for target in Target:
                trained = self.model.samples(cls, target)
                if not trained:
                    continue
                row: dict[str, object] = {"class": cls, "target": str(target), "trained": trained}
                s = errors.get((cls, target))
                if s is not None:
                    row.update(samples=s.samples, mape=s.mape, p90_abs_error_ms=s.p90_abs_error_ms,
                               coverage=s.coverage)
                rows.append(row)
        return rows


    def endpoint_status(self, endpoint: Endpoint) -> dict[str, str]:
        """For `epp endpoints`: the endpoint's hardware class, the prediction of its last dispatch,
        and the recent error of the model that predicts for it (its class's, else the pool's)."""
        cls = endpoint_class(endpoint.labels)
        out = {"latency-class": cls, "latency-running": str(self.running.count(endpoint))}
        last = self._last.get(endpoint)
        if last is not None and last.ttft_ms is not None:
            out["latency-last-predicted-ttft"] = f"{last.ttft_ms:.1f}ms"
            if self.streaming and last.tpot_ms is not None:
                out["latency-last-predicted-tpot"] = f"{last.tpot_ms:.2f}ms"
        now = self.clock()
        if now - self._rows[0] >= ROWS_TTL_S:
            self._rows = (now, self.error_rows())
        rows = self._rows[1]
        for target in Target:
            row = next((r for r in rows if r["class"] == cls and r["target"] == target), None)
            row = row if row is not None and row["trained"] >= self.model.min_samples else next(  # type: ignore[operator]
                (r for r in rows if r["class"] == POOL and r["target"] == target), None)
            if row is None:
                continue
            model = "pool" if row["class"] == POOL else "class"
            out[f"latency-{target}-samples"] = f"{row['trained']} ({model})"
            if "mape" in row:
                out[f"latency-{target}-mape"] = f"{float(row['mape']) * 100:.1f}%"  # type: ignore[arg-type]
                out[f"latency-{target}-p90-error"] = f"{float(row['p90_abs_error_ms']):.1f}ms"  # type: ignore[arg-type]
        if self.sidecar is not None:
            s = self.sidecar.status
            out["latency-sidecars"] = (f"predictions={s.predictions} failures={s.prediction_failures} "
                                       f"samples-sent={s.samples_sent}")
        return out
