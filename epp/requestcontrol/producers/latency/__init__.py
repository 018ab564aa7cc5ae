"""Online, in-process latency prediction: each endpoint's TTFT and time per output token
(TPOT) for a request, learnt from the latencies the picker observes: the model behind
predicted-latency-producer (producer.py), which trains it in its own background thread.

    model = LatencyModel()                      # one per pool: typical latency ("mean"); quantile=0.9: p90
    cls = endpoint_class(endpoint.labels)       # hardware class: accelerator label
    f = LatencyFeatures(kv_cache_usage=..., waiting_requests=..., running_requests=...,
                        input_tokens=..., prefix_match=..., prefill_tokens_in_flight=...,
                        decode_tokens_in_flight=...)
    model.predict(cls, f)                       # hot path: LatencyPrediction(ttft_ms, tpot_ms), None until learnt
    model.observe_ttft(cls, f, ttft_ms)         # response path, O(1); f as at dispatch
    model.observe_tpot(cls, f, tpot_ms)
    Trainer(model).maybe_train()                # off the hot path: trains when enough samples wait
    model.errors()                              # per (class, target): MAPE, p90 |error|, coverage

Method (chosen by `python -m bench.latency_model_cost`, 4,000 samples of a vLLM-like law
with lognormal noise whose floor is MAPE 9.6 % TTFT / 6.4 % TPOT, 2 shared cores under load):
  ridge-knee (shipped)  TTFT MAPE 10.0 %, p90 |e| 74 ms; TPOT 6.3 %, 2.0 ms; 2.7-6 us/prediction
                        per target; 29-68 ms per 1,000 samples trained (pool and class models)
  gbt (numpy refit, 100 depth-3 trees, 4,096-sample reservoir)  TTFT 10.9 %, 80 ms; TPOT 6.6 %;
                        26-55 us/prediction in Python; 0.55-1.2 s per 1,000 samples
  ridge-raw (the reference's bayesian_ridge columns, no knee)  TTFT 53.5 %; TPOT 16.9 %
With the law's knee moved to 0.75 / 0.95 the two are level (11.0/11.0 %, 12.1/11.3 %); with
1,000 samples ridge-knee learns faster (10.0 % vs 12.2 %). Equal accuracy at a tenth of
the prediction cost, no dependency, bounded O(d^2) state: forgetting ridge on knee bases.

sidecar_json.py converts LatencyFeatures to and from the sidecars' JSON shapes below.

Reference facts (kubernetes-sigs/gateway-api-inference-extension v1.5.0), for the sidecar client:
- sidecars/latencypredictorasync/types.go: the predictor client. Env TRAINING_SERVER_URL
  (default http://localhost:8000), PREDICTION_SERVER_URL (comma list, http://localhost:8001),
  LATENCY_FLUSH_INTERVAL_SEC 1, LATENCY_MAX_SAMPLE_SIZE 1000 (per flush, sampled),
  LATENCY_HTTP_TIMEOUT_SEC 10, LATENCY_METRICS_INTERVAL_SEC 60, LATENCY_MAX_BULK_SIZE 100,
  LATENCY_COALESCE_WINDOW_MS 1, LATENCY_MAX_CONCURRENT_DISPATCHES 36, LATENCY_USE_NATIVE_XGBOOST.
  Training entry JSON: kv_cache_percentage (0..1), input_token_length, num_request_waiting,
  num_request_running, num_tokens_generated, actual_ttft_ms, actual_tpot_ms,
  prefix_cache_score (0..1), pod_type ("" | "prefill" | "decode"), prefill_tokens_in_flight,
  decode_tokens_in_flight, timestamp. A prediction request has the same minus actual_* and
  timestamp; the response: ttft_ms, tpot_ms, ttft_uncertainty, tpot_uncertainty,
  ttft_prediction_bounds, tpot_prediction_bounds, predicted_at, model_type, objective_type,
  quantile, last_model_load.
- latencypredictor/training_server.py (port 8000): POST /add_training_data_bulk
  {"entries": [...]} -> 202; POST /predict; GET /healthz, /readyz, /metrics (Prometheus text),
  /data/status, /models/list, /model/download/info, /model/{name}/info, /model/{name}/download,
  /model/{ttft,tpot}/xgb/json, /model/{ttft,tpot}/lgb/txt; POST /flush. LATENCY_MODEL_TYPE
  bayesian_ridge | xgboost (default: 200 trees, depth 6, lr 0.05) | lightgbm;
  LATENCY_OBJECTIVE_TYPE quantile (the code default, LATENCY_QUANTILE_ALPHA 0.9: it predicts
  p90) or mean (what both charts set for both servers: GIE v1.5 config/charts/epplib/values.yaml,
  llm-d-router config/charts/routerlib/values.yaml; the EPP container gets only
  PREDICTION_SERVER_URL, TRAINING_SERVER_URL and the chart's eppEnv); refit every
  LATENCY_RETRAINING_INTERVAL_SEC (1800) once LATENCY_MIN_SAMPLES_FOR_RETRAIN (1000) samples;
  samples kept per bucket (waiting 0/1-2/3-5/6-10/11+ x KV 20 bins x prefix 4
  bins) up to LATENCY_MAX_TRAINING_DATA_SIZE_PER_BUCKET (500), 10 % held out as test data
  (at most 1000); "ensemble mode" fits queued and no-queue sub-models apart. TTFT columns:
  is_queued, kv_cache_percentage, input_token_length, num_request_waiting,
  num_request_running, prefill/decode_tokens_in_flight, prefix_cache_score,
  effective_input_tokens = (1 - prefix) * input, prefill_score_bucket, pod_type; TPOT: the
  same without the prefix columns, plus num_tokens_generated.
- latencypredictor/prediction_server.py (ports from the chart's predictionServers.startPort,
  8001 up): POST /predict, /predict/bulk, /predict/bulk/strict ({"requests": [...]} ->
  {"predictions": [...], total_requests, successful_predictions, failed_predictions,
  processing_time_ms}); GET /status, /healthz, /readyz; POST /reload. Pulls models from the
  training server every MODEL_SYNC_INTERVAL_SEC (10).
- pkg/epp/framework/plugins/requestcontrol/requestdataproducer/predictedlatency (training.go,
  README.md): input_token_length is the prompt's whitespace-separated word count; TTFT runs
  from request receipt to the first streamed chunk (streamingMode true) or to the end
  (false: end-to-end latency, TPOT not trained); TPOT = (e2e - TTFT) / (generated - 1) at
  the end; headroom = SLO - predicted. Parameters: samplingMean 1000,
  maxDecodeTokenSamplesForPrediction 0, sloBufferFactor 1.0, contextTTL 5m, streamingMode
  false, endpointRoleLabel "", predictInPrepareData true.
- llm-d/llm-d-router (HEAD of 2026-08): the same producer under
  pkg/epp/framework/plugins/requestcontrol/dataproducer/predictedlatency (predictInPrepareData
  renamed predictInProduce; new useEncoderCacheFeatures, encoderCacheMatchInfoProducerName),
  its client in .../predictedlatency/latencypredictorclient (entries and requests gain
  encoder_input_size, encoder_matched_size); the Python service moved to
  llm-d/llm-d-latency-predictor. With bayesian_ridge the client predicts in process from
  the cached coefficients; xgboost/lightgbm go over HTTP bulk calls. Its PreRequest sets
  decode_tokens_in_flight to 0 ("only accurate in pure streaming mode"; the producer here
  counts the prompt tokens of requests past their first chunk instead).
Objective: LatencyModel() predicts the typical latency (relative least squares, the
reference's "mean"); LatencyModel(quantile=0.9) predicts the 0.9 quantile (the reference
servers' code default): the typical prediction times exp(the 0.9 quantile of recent residuals
log(actual / typical)), per octave band of the typical prediction (model.ResidualQuantile).
The predicted-latency-producer reads LATENCY_OBJECTIVE_TYPE and LATENCY_QUANTILE_ALPHA
(model.objective_from_env); unset, the objective is "mean", what the reference charts deploy."""

from .features import (
    DEFAULT_CLASS,
    DEFAULT_CLASS_LABELS,
    TPOT_BASIS,
    TTFT_BASIS,
    LatencyFeatures,
    clean,
    endpoint_class,
    tpot_basis,
    ttft_basis,
)
from .model import (
    ERROR_WINDOW,
    MAX_CLASSES,
    PENDING_MAX,
    POOL,
    ErrorStats,
    ForgettingRidge,
    LatencyModel,
    LatencyPrediction,
    Target,
    TrainReport,
)
from .trainer import Trainer

__all__ = [
    "DEFAULT_CLASS", "DEFAULT_CLASS_LABELS", "ERROR_WINDOW", "MAX_CLASSES", "PENDING_MAX", "POOL", "TPOT_BASIS",
    "TTFT_BASIS", "ErrorStats", "ForgettingRidge", "LatencyFeatures", "LatencyModel", "LatencyPrediction", "Target",
    "TrainReport", "Trainer", "clean", "endpoint_class", "tpot_basis", "ttft_basis",
]
