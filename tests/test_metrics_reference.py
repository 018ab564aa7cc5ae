"""The picker's metrics against the reference's (tests/fixtures/reference/metrics.txt, read
from llm-d/llm-d-router pkg/epp/metrics): every family it registers has the reference's
type, label names and buckets, and each is recorded at the moment the reference records it."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.errors import InferenceError
from epp.flowcontrol.admission import AdmissionController
from epp.framework import Metrics
from epp.handlers.stream import ExtProcHandler
from epp.options import parse_args
from epp.requestcontrol.director import Director
from epp.telemetry import Telemetry
from tests.helpers import Clock, rewrite, until
from tests.servers import RawServer, length_response
from tests.test_admission import controller, flow_config, pool, req, set_saturated
from tests.test_director import FirstEndpoint, OpenGate, body, datastore, headers
from tests.test_reference_fixtures import rows

# The reference's core families this picker registers (its data exists here). The rest of
# metrics.txt's core families wait for the issue that brings their data (see DEFERRED).
IMPLEMENTED = {
    "inference_objective_request_total", "inference_objective_request_error_total",
    "inference_objective_request_duration_seconds", "inference_objective_request_sizes",
    "inference_objective_response_sizes", "inference_objective_input_tokens", "inference_objective_output_tokens",
    "inference_objective_prompt_cached_tokens", "inference_objective_running_requests",
    "inference_objective_normalized_time_per_output_token_seconds", "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size", "inference_pool_average_running_requests", "inference_pool_ready_pods",
    "inference_pool_per_pod_queue_size", "inference_extension_scheduler_e2e_duration_seconds",
    "inference_extension_scheduler_attempts_total", "inference_extension_plugin_duration_seconds",
    "inference_extension_info", "inference_extension_flow_control_request_queue_duration_seconds",
    "inference_extension_flow_control_dispatch_cycle_duration_seconds",
    "inference_extension_flow_control_request_enqueue_duration_seconds",
    "inference_extension_flow_control_queue_size", "inference_extension_flow_control_queue_bytes",
    "inference_extension_flow_control_pool_saturation", "inference_extension_model_rewrite_decisions_total",
    "llm_d_inference_scheduler_datalayer_poll_errors_total",
    "llm_d_inference_scheduler_datalayer_extract_errors_total",
    "llm_d_epp_request_total", "llm_d_epp_request_error_total", "llm_d_epp_request_duration_seconds",
    "llm_d_epp_request_size_bytes", "llm_d_epp_response_size_bytes", "llm_d_epp_request_input_tokens",
    "llm_d_epp_request_output_tokens", "llm_d_epp_request_cached_tokens", "llm_d_epp_request_running",
    "llm_d_epp_request_ntpot_seconds", "llm_d_epp_request_ttft_seconds", "llm_d_epp_request_streaming_tpot_seconds",
    "llm_d_epp_request_streaming_itl_seconds", "llm_d_epp_average_kv_cache_utilization",
    "llm_d_epp_average_queue_size", "llm_d_epp_average_running_requests", "llm_d_epp_std_dev_kv_cache_utilization",
    "llm_d_epp_std_dev_queue_size", "llm_d_epp_std_dev_running_requests", "llm_d_epp_ready_endpoints",
    "llm_d_epp_per_endpoint_queue_size", "llm_d_epp_scheduler_e2e_duration_seconds",
    "llm_d_epp_scheduler_attempts_total", "llm_d_epp_plugin_duration_seconds",
    "llm_d_epp_request_processing_duration_seconds", "llm_d_epp_response_processing_duration_seconds",
    "llm_d_epp_info", "llm_d_epp_flow_control_request_queue_duration_seconds",
    "llm_d_epp_flow_control_dispatch_cycle_duration_seconds",
    "llm_d_epp_flow_control_request_enqueue_duration_seconds", "llm_d_epp_flow_control_queue_size",
    "llm_d_epp_flow_control_queue_bytes", "llm_d_epp_flow_control_pool_saturation",
    "llm_d_epp_flow_control_capacity_utilization_requests", "llm_d_epp_flow_control_capacity_utilization_bytes",
    "llm_d_epp_flow_control_global_capacity_utilization_bytes", "llm_d_epp_flow_control_requests_total",
    "llm_d_epp_model_rewrite_decisions_total", "llm_d_epp_datalayer_poll_errors_total",
    "llm_d_epp_datalayer_extract_errors_total",
}
DETECTOR_FAMILIES = {"llm_d_epp_flow_control_stale_endpoints"}  # registered by the utilization-detector
EVICTION_FAMILIES = {  # epp.flowcontrol.eviction.EvictionMetrics, registered by the server (tests/test_eviction.py)
    "llm_d_epp_flow_control_revocations_issued_total", "llm_d_epp_flow_control_revocations_total",
    "llm_d_epp_flow_control_reclaim_target", "llm_d_epp_flow_control_pending_reclaim",
    "llm_d_epp_flow_control_revocation_confirmation_seconds"}
STREAM_FAMILIES = {"llm_d_epp_extproc_streams_inflight", "llm_d_epp_extproc_stream_duration_seconds",
                   "llm_d_epp_extproc_streams_total"}  # with --enable-grpc-stream-metrics
# Core families not registered: their data comes with another issue (an always-zero family would lie).
DEFERRED = {
    "llm_d_epp_plugin_data_scope_violations_total",  # no data-scope enforcement of plugins yet
    "llm_d_epp_flow_control_global_capacity_utilization_requests",  # global maxRequests (issue 11)
}


def reference() -> dict[str, tuple[str, tuple[str, ...], tuple[float, ...] | None, str]]:
    """name -> (type, label names, buckets or None, scope) from metrics.txt."""
    out = {}
    for name, kind, labels, buckets, _gist, scope, _file in rows("metrics.txt", 7):
        out[name] = (kind, tuple(labels.split(",")) if labels != "-" else (),
                     tuple(float(b) for b in buckets.split(",")) if buckets != "-" and "default" not in buckets
                     else None, scope)
    return out


def exposition(text: str) -> dict[str, tuple[str, set[frozenset[str]], tuple[float, ...] | None]]:
    """name -> (type, the label-name sets of its samples, histogram buckets) from /metrics text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name.endswith("_created"):  # prometheus_client's creation stamps (the Go client has none)
            continue
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        label_sets, buckets = set(), None
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            label_sets.add(frozenset(k for k in s.labels if k != "le"))
            if s.name.endswith("_bucket") and buckets is None:
                buckets = tuple(float(x.labels["le"]) for x in fam.samples
                                if x.name.endswith("_bucket") and x.labels["le"] != "+Inf"
                                and {k: v for k, v in x.labels.items() if k != "le"}
                                == {k: v for k, v in s.labels.items() if k != "le"})
        out[name] = (fam.type, label_sets, buckets)
    return out


def assert_matches_reference(text: str, must_have_samples: set[str]) -> set[str]:
    """Every reference family on the page has the reference's type, label names and buckets;
    returns the reference families present."""
    ref, page = reference(), exposition(text)
    present = set(ref) & set(page)
    for name in present:
        kind, labels, buckets, _ = ref[name]
        got_kind, label_sets, got_buckets = page[name]
        assert got_kind == kind, name
        assert label_sets <= {frozenset(labels)}, (name, label_sets, labels)
        if buckets is not None and got_buckets is not None:
            assert got_buckets == buckets, name
    empty = {n for n in must_have_samples if not page.get(n, ("", set(), None))[1]}
    assert not empty, f"no samples: {sorted(empty)}"
    return present


# ------------------------------------------------------------------ the families themselves
def test_the_fixture_is_the_reference_list():
    ref = reference()
    assert len(ref) == 136 and IMPLEMENTED | STREAM_FAMILIES <= set(ref)
    core = {n for n, (_, _, _, scope) in ref.items() if scope == "core"}
    # every core family is either built (by the picker, or by the detector that records it) or waits for its issue
    assert core == IMPLEMENTED | DETECTOR_FAMILIES | EVICTION_FAMILIES | DEFERRED


def test_registered_families_are_exactly_the_implemented_ones_with_the_references_shape():
    """Every family the assembled picker registers (flow control and stream metrics on),
    each with samples, compared with metrics.txt."""
    tel, ds, admission, director = flow_controlled_picker(grpc_stream_metrics=True)
    queued_page = asyncio.run(exercise(tel, ds, admission, director))
    text = generate_latest(tel.registry).decode()
    page = exposition(text)
    ref = reference()
    ours = {n for n in page if n.startswith(("llm_d_epp_", "inference_", "llm_d_inference_scheduler_"))}
    assert ours == IMPLEMENTED | STREAM_FAMILIES, (ours - IMPLEMENTED - STREAM_FAMILIES,
                                                   IMPLEMENTED | STREAM_FAMILIES - ours)
    queued = {"inference_extension_flow_control_queue_size", "inference_extension_flow_control_queue_bytes",
              "llm_d_epp_flow_control_queue_size", "llm_d_epp_flow_control_queue_bytes"}
    assert_matches_reference(queued_page, queued)
    assert_matches_reference(text, (IMPLEMENTED | STREAM_FAMILIES) - queued)
    for name in ours:  # and no family with a made-up shape: all of them are the reference's
        assert name in ref


def test_stream_families_only_with_the_flag():
    assert not STREAM_FAMILIES & set(exposition(generate_latest(Telemetry().registry).decode()))
    assert STREAM_FAMILIES <= set(exposition(generate_latest(Telemetry(grpc_stream_metrics=True).registry).decode()))


# ------------------------------------------------------------------ a picker, exercised
def flow_controlled_picker(grpc_stream_metrics: bool = False):
    tel = Telemetry(grpc_stream_metrics=grpc_stream_metrics)
    ds = datastore(2)
    admission = controller(flow_config(bands="[{priority: 0, maxRequests: 4, maxBytes: 1000}]"))
    admission.observe_flow = tel.flow_control_observer()
    admission.observe_dispatch_cycle = tel.flow_control_dispatch_cycle.observe
    tel.add_pool_collector(ds, "pool", staleness=60)
    tel.add_picker_collector(admission)
    director = Director(ds, FirstEndpoint(), admission=OpenGate(), telemetry=tel, clock=Clock(100.0))
    return tel, ds, admission, director


SSE_CHUNKS = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":"b"}]}\n\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,'
              b'"prompt_tokens_details":{"cached_tokens":2}}}\n\ndata: [DONE]\n\n']


async def exercise(tel, ds, admission, director) -> str:
    """One of everything: a streamed and an unstreamed response, a model-server error, a
    request-phase failure, a queued request, datalayer errors and an ext_proc stream.
    Returns the page scraped while the request was queued."""
    for e in ds.endpoints():
        ds.set_metrics(e, Metrics(waiting_queue_size=2, running_requests_size=1, kv_cache_usage_percent=0.5,
                                  update_time=time.monotonic(), ok=True))
    await streamed(director)
    await unary(director, status=500)
    empty = Director(Datastore(), FirstEndpoint(), admission=OpenGate(), telemetry=tel)
    ctx = empty.new_context(headers())
    with pytest.raises(InferenceError) as e:
        await empty.route(ctx, body("m"), None)
    empty.failed(ctx, e.value)
    tel.model_rewrite_decisions.get("", "m", "m2").inc()
    endpoints = pool(True)
    queued = asyncio.create_task(admission.admit(req("q", size=10), endpoints))
    await until(lambda: admission.queue_size == 1)
    queued_page = generate_latest(tel.registry).decode()  # the queue gauges have samples while it waits
    set_saturated(endpoints[0], False)
    (await asyncio.wait_for(queued, 5))()
    set_saturated(endpoints[0], True)
    with pytest.raises(InferenceError):
        await admission.admit(req("big", size=5000), endpoints)  # over the band's maxBytes: rejected at enqueue
    await admission.close()
    tel.datalayer_error("poll")
    tel.datalayer_error("extract")
    tel.plugin_observer()("Scorer", "queue-scorer", "queue-scorer", 0.0003)
    handler = ExtProcHandler(director)
    handler.new_stream().close()
    return queued_page


async def streamed(director: Director):
    clock = director.clock
    ctx = director.new_context(headers())
    clock.now += 0.002
    await director.route(ctx, body("m", stream=True), None)
    clock.now += 0.1
    director.response_headers(ctx, 200, {"content-type": "text/event-stream"}, "")
    for gap, chunk in zip((0.2, 0.05, 0.15), SSE_CHUNKS, strict=True):
        clock.now += gap
        director.response_body(ctx, chunk, chunk is SSE_CHUNKS[-1])
    director.complete(ctx)
    return ctx


async def unary(director: Director, status: int = 200):
    clock = director.clock
    ctx = director.new_context(headers())
    await director.route(ctx, body("m"), None)
    clock.now += 0.4
    director.response_headers(ctx, status, {"content-type": "application/json"}, "")
    director.response_body(ctx, b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}', True)
    director.complete(ctx)
    return ctx


def value(tel: Telemetry, metric: str, /, **labels) -> float | None:
    return tel.registry.get_sample_value(metric, labels)


REQ = {"model_name": "m", "target_model_name": "m", "fairness_id": "default-flow", "priority": "0"}
LEGACY = {"model_name": "m", "target_model_name": "m"}


async def test_request_families_at_the_references_moments():
    tel, _ds, _adm, director = flow_controlled_picker()
    clock = director.clock
    ctx = director.new_context(headers())
    clock.now += 0.002
    await director.route(ctx, body("m", stream=True), None)
    # routed: counted, sized, running; nothing of the response yet
    assert value(tel, "llm_d_epp_request_total", **REQ) == 1
    assert value(tel, "inference_objective_request_total", model_name="m", target_model_name="m", priority="0") == 1
    assert value(tel, "llm_d_epp_request_size_bytes_count", **REQ) == 1
    assert value(tel, "llm_d_epp_request_running", **REQ) == 1
    assert value(tel, "inference_objective_running_requests", model_name="m") == 1
    assert value(tel, "llm_d_epp_request_duration_seconds_count", **REQ) is None
    assert value(tel, "llm_d_epp_request_processing_duration_seconds_bucket", le="0.002") == 1
    assert value(tel, "llm_d_epp_request_processing_duration_seconds_bucket", le="0.001") == 0
    assert value(tel, "llm_d_epp_scheduler_attempts_total", status="success", target_model_name="m",
                 endpoint_name="ep0", namespace="default", port="8000") == 1
    assert value(tel, "inference_extension_scheduler_attempts_total", status="success", target_model_name="m",
                 pod_name="ep0", namespace="default", port="8000") == 1
    clock.now += 0.1
    director.response_headers(ctx, 200, {"content-type": "text/event-stream"}, "")
    for gap, chunk in zip((0.2, 0.05, 0.15), SSE_CHUNKS, strict=True):
        clock.now += gap
        director.response_body(ctx, chunk, chunk is SSE_CHUNKS[-1])
    # inter-chunk latency per chunk after the first, while streaming
    assert value(tel, "llm_d_epp_request_streaming_itl_seconds_count", **REQ) == 2
    assert value(tel, "llm_d_epp_request_streaming_itl_seconds_bucket", **REQ, le="0.06") == 1
    assert value(tel, "llm_d_epp_request_running", **REQ) == 1  # until the end of the response
    director.complete(ctx)
    assert value(tel, "llm_d_epp_request_running", **REQ) == 0
    assert value(tel, "inference_objective_running_requests", model_name="m") == 0
    assert value(tel, "llm_d_epp_request_duration_seconds_sum", **REQ) == pytest.approx(0.502)
    assert value(tel, "inference_objective_request_duration_seconds_sum", **LEGACY) == pytest.approx(0.502)
    ttft = {**REQ, "streaming": "true"}
    assert value(tel, "llm_d_epp_request_ttft_seconds_sum", **ttft) == pytest.approx(0.302)
    # (e2e - ttft) / (output tokens - 1)
    assert value(tel, "llm_d_epp_request_streaming_tpot_seconds_sum", **REQ) == pytest.approx(0.2 / 4)
    assert value(tel, "llm_d_epp_request_ntpot_seconds_sum", **REQ) == pytest.approx(0.502 / 5)
    assert value(tel, "llm_d_epp_request_input_tokens_sum", **REQ) == 3
    assert value(tel, "llm_d_epp_request_output_tokens_sum", **REQ) == 5
    assert value(tel, "llm_d_epp_request_cached_tokens_sum", **REQ) == 2
    assert value(tel, "inference_objective_prompt_cached_tokens_sum", **LEGACY) == 2
    assert value(tel, "llm_d_epp_response_size_bytes_sum", **REQ) == sum(map(len, SSE_CHUNKS))
    assert value(tel, "llm_d_epp_response_processing_duration_seconds_count") == 1
    assert value(tel, "llm_d_epp_request_error_total", **REQ, error_code="ModelServerError") is None


async def test_unary_response_ttft_is_labelled_not_streaming_and_has_no_tpot():
    tel, _ds, _adm, director = flow_controlled_picker()
    clock = director.clock
    ctx = director.new_context(headers())
    await director.route(ctx, body("m"), None)
    clock.now += 0.1
    director.response_headers(ctx, 200, {"content-type": "application/json"}, "")
    clock.now += 0.1
    director.response_body(ctx, b'{"usage": {"prompt_tokens": 3, ', False)
    clock.now += 0.2
    director.response_body(ctx, b'"completion_tokens": 4}}', True)
    director.complete(ctx)
    # the reference reads an unstreamed body whole: its first token comes with its end
    assert value(tel, "llm_d_epp_request_ttft_seconds_sum", **REQ, streaming="false") == pytest.approx(0.4)
    # and holds it from the response headers to then
    assert value(tel, "llm_d_epp_response_processing_duration_seconds_sum") == pytest.approx(0.3)
    assert value(tel, "llm_d_epp_request_ttft_seconds_count", **REQ, streaming="true") is None
    assert value(tel, "llm_d_epp_request_streaming_tpot_seconds_count", **REQ) is None
    assert value(tel, "llm_d_epp_request_streaming_itl_seconds_count", **REQ) is None
    assert value(tel, "llm_d_epp_request_ntpot_seconds_sum", **REQ) == pytest.approx(0.1)


async def test_errors_carry_the_references_codes():
    tel, _ds, _adm, director = flow_controlled_picker()
    await unary(director, status=503)  # any status but 200 is the model server's error
    assert value(tel, "llm_d_epp_request_error_total", **REQ, error_code="ModelServerError") == 1
    assert value(tel, "inference_objective_request_error_total", **LEGACY, error_code="ModelServerError") == 1
    empty = Director(Datastore(), FirstEndpoint(), admission=OpenGate(), telemetry=tel)
    ctx = empty.new_context(headers())
    with pytest.raises(InferenceError) as e:
        await empty.route(ctx, body("m"), None)
    empty.failed(ctx, e.value)
    assert value(tel, "llm_d_epp_request_error_total", **REQ, error_code="ServiceUnavailable") == 1
    # a request-phase failure ends its processing time there (the routed one counted at its routing)
    assert value(tel, "llm_d_epp_request_processing_duration_seconds_count") == 2
    assert value(tel, "llm_d_epp_request_total", **REQ) == 1  # only the routed one


async def test_fairness_ids_are_bounded_label_values():
    tel = Telemetry(max_model_labels=2)
    ids = [tel.series("m", "m", f"tenant-{i}", 0)._key[2] for i in range(5)]  # noqa: SLF001
    assert ids == ["tenant-0", "tenant-1", "other", "other", "other"]


async def test_flow_control_families_follow_a_queued_request():
    tel, _ds, admission, _director = flow_controlled_picker()
    endpoints = pool(True)
    task = asyncio.create_task(admission.admit(req("q", size=10, flow="tenant"), endpoints))
    await until(lambda: admission.queue_size == 1)
    queued = {"fairness_id": "tenant", "priority": "0", "inference_pool": "pool", "model_name": "m",
              "target_model_name": "m"}
    assert value(tel, "llm_d_epp_flow_control_queue_size", **queued) == 1
    assert value(tel, "inference_extension_flow_control_queue_bytes", **queued) == 10
    assert value(tel, "llm_d_epp_flow_control_capacity_utilization_requests", priority="0",
                 inference_pool="pool") == 0.25
    assert value(tel, "llm_d_epp_flow_control_request_enqueue_duration_seconds_count", fairness_id="tenant",
                 priority="0", outcome="NotYetFinalized") == 1
    assert value(tel, "llm_d_epp_flow_control_pool_saturation", inference_pool="pool", stage="effective") >= 1
    set_saturated(endpoints[0], False)
    (await asyncio.wait_for(task, 5))()
    outcome = {**queued, "outcome": "Dispatched"}
    assert value(tel, "llm_d_epp_flow_control_request_queue_duration_seconds_count", **outcome) == 1
    assert value(tel, "inference_extension_flow_control_request_queue_duration_seconds_count", **outcome) == 1
    assert value(tel, "llm_d_epp_flow_control_requests_total", outcome="Dispatched", priority="0",
                 inference_pool="pool") == 1
    assert value(tel, "llm_d_epp_flow_control_queue_size", **queued) is None  # nothing queued any more
    assert value(tel, "llm_d_epp_flow_control_dispatch_cycle_duration_seconds_count") >= 1
    set_saturated(endpoints[0], True)  # so the next request would queue
    with pytest.raises(InferenceError):
        await admission.admit(req("big", size=5000), endpoints)
    assert value(tel, "llm_d_epp_flow_control_requests_total", outcome="RejectedCapacity", priority="0",
                 inference_pool="pool") == 1
    await admission.close()


async def test_flow_control_ttl_expiry_is_the_references_outcome():
    tel = Telemetry()
    admission = controller(flow_config(ttl="30ms"))
    admission.observe_flow = tel.flow_control_observer()
    with pytest.raises(InferenceError):
        await admission.admit(req("a"), pool(True))
    assert value(tel, "llm_d_epp_flow_control_requests_total", outcome="EvictedTTL", priority="0",
                 inference_pool="static") == 1
    await admission.close()


async def test_legacy_admission_records_no_flow_control_outcomes():
    tel = Telemetry()
    admission = AdmissionController(None)
    admission.observe_flow = tel.flow_control_observer()
    (await admission.admit(req("a"), pool(False)))()
    assert "llm_d_epp_flow_control_requests_total{" not in generate_latest(tel.registry).decode()


def test_pool_gauges_mean_std_dev_and_per_endpoint():
    tel = Telemetry()
    ds = Datastore()
    for i, (queue, kv) in enumerate(((1, 0.2), (3, 0.6))):
        ds.upsert(EndpointSpec(name=f"pod-rank-{i}", address="10.0.0.1", port=8000 + i, pod_name="pod"))
        ds.set_metrics(ds.endpoints()[i], Metrics(waiting_queue_size=queue, kv_cache_usage_percent=kv,
                                                  update_time=time.monotonic(), ok=True))
    tel.add_pool_collector(ds, "pool", staleness=60)
    assert value(tel, "llm_d_epp_average_queue_size", name="pool") == 2
    assert value(tel, "llm_d_epp_std_dev_queue_size", name="pool") == 1
    assert value(tel, "llm_d_epp_std_dev_kv_cache_utilization", name="pool") == pytest.approx(0.2)
    assert value(tel, "inference_pool_average_kv_cache_utilization", name="pool") == pytest.approx(0.4)
    assert value(tel, "llm_d_epp_ready_endpoints", name="pool") == 2
    # each rank of a pod is its own series, named as the reference's endpoint ids (<pod>-rank-<i>)
    assert value(tel, "llm_d_epp_per_endpoint_queue_size", name="pool", model_server_endpoint="pod-rank-1") == 3
    assert value(tel, "inference_pool_per_pod_queue_size", name="pool", model_server_pod="pod-rank-1") == 3
    assert value(tel, "inference_pool_per_pod_queue_size", name="pool", model_server_pod="pod-rank-0") == 1


def test_datalayer_errors_and_info():
    tel = Telemetry(commit="abc", build_ref="v1")
    tel.datalayer_error("poll")
    tel.datalayer_error("extract")
    tel.datalayer_error("extract")
    assert value(tel, "llm_d_epp_datalayer_poll_errors_total", source_type="metrics-data-source") == 1
    assert value(tel, "llm_d_inference_scheduler_datalayer_extract_errors_total", source_type="metrics-data-source",
                 extractor_type="core-metrics-extractor") == 2
    assert value(tel, "llm_d_epp_info", commit="abc", build_ref="v1") == 1
    tel.datalayer_error("poll", "models-data-source", "models-data-extractor")  # the data layer's 3-argument hook
    assert value(tel, "llm_d_epp_datalayer_poll_errors_total", source_type="models-data-source") == 1


async def test_the_collector_reports_poll_errors():
    from epp.datalayer.collector import MetricsCollector

    async def fail(_reader, writer, _conn, _n, _head) -> bool:
        writer.write(length_response(b"", "500 Internal Server Error"))
        await writer.drain()
        return True

    async with RawServer(fail) as server:
        tel = Telemetry()
        ds = Datastore()
        ds.upsert(EndpointSpec(name="ep", address="127.0.0.1", port=server.port))
        collector = MetricsCollector(ds, interval=0.01)
        collector.on_error = tel.datalayer_error
        await collector.start()
        try:
            await until(lambda: (value(tel, "llm_d_epp_datalayer_poll_errors_total",
                                       source_type="metrics-data-source") or 0) >= 1)
        finally:
            await collector.stop()


def test_grpc_stream_families():
    tel = Telemetry(grpc_stream_metrics=True)
    director = Director(Datastore(), FirstEndpoint(), admission=OpenGate(), telemetry=tel)
    handler = ExtProcHandler(director)
    st = handler.new_stream()
    assert value(tel, "llm_d_epp_extproc_streams_inflight") == 1
    st.close()
    st.close()  # once only
    assert value(tel, "llm_d_epp_extproc_streams_inflight") == 0
    assert value(tel, "llm_d_epp_extproc_streams_total", code="Canceled") == 1
    assert value(tel, "llm_d_epp_extproc_stream_duration_seconds_count") == 1
    off = Telemetry()
    ExtProcHandler(Director(Datastore(), FirstEndpoint(), admission=OpenGate(), telemetry=off)).new_stream().close()
    assert value(off, "llm_d_epp_extproc_streams_total", code="Canceled") is None


def test_the_server_wires_flow_control_and_collector_hooks():
    from epp.server import PickerServer

    picker = PickerServer(parse_args(["--endpoints=10.0.0.1:80"]))
    assert picker.admission.observe_flow is not None and picker.admission.observe_dispatch_cycle is not None
    names = set(exposition(generate_latest(picker.telemetry.registry).decode()))
    assert {"llm_d_epp_request_total", "llm_d_epp_ready_endpoints", "llm_d_epp_flow_control_pool_saturation",
            "inference_objective_request_total"} <= names
    assert not math.isnan(value(picker.telemetry, "llm_d_epp_ready_endpoints", name="static"))


PREFIX_FAMILIES = {"llm_d_epp_prefix_indexer_size", "llm_d_epp_prefix_indexer_hit_ratio",
                   "llm_d_epp_prefix_indexer_hit_bytes", "inference_extension_prefix_indexer_size",
                   "inference_extension_prefix_indexer_hit_ratio", "inference_extension_prefix_indexer_hit_bytes"}


def test_prefix_producer_families_per_instance_and_legacy_summed():
    from prometheus_client import CollectorRegistry

    from epp.assembly import build_plugin
    from epp.framework import PluginHandle
    from epp.framework.metrics import PluginMetrics
    from tests.test_plugins_prefix import commit, ep
    from tests.test_plugins_prefix import req as prefix_req

    reg = CollectorRegistry()
    handle = PluginHandle(metrics=PluginMetrics(reg))
    first = build_plugin("approx-prefix-cache-producer", "first", None, handle, "t")
    second = build_plugin("approx-prefix-cache-producer", "second", {"autoTune": False}, handle, "t")
    block = "x" * 4096  # prompts of several blocks whatever the block size
    commit(first, prefix_req("a" * 4 * len(block)), ep(1))
    commit(first, prefix_req("a" * 2 * len(block) + "b" * 2 * len(block)), ep(2))  # part of the prefix found
    commit(second, prefix_req("c" * 4 * len(block)), ep(1))
    text = generate_latest(reg).decode()
    assert set(exposition(text)) == PREFIX_FAMILIES
    assert_matches_reference(text, PREFIX_FAMILIES)

    def sample(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, labels)

    me = {"plugin_name": "first", "plugin_type": "approx-prefix-cache-producer"}
    assert sample("llm_d_epp_prefix_indexer_size", **me) == len(first.index)
    assert sample("llm_d_epp_prefix_indexer_size", plugin_name="second",
                  plugin_type="approx-prefix-cache-producer") == len(second.index)
    assert sample("inference_extension_prefix_indexer_size") == len(first.index) + len(second.index)
    other = {"plugin_name": "second", "plugin_type": "approx-prefix-cache-producer"}
    assert sample("llm_d_epp_prefix_indexer_hit_ratio_count", **me) == 2  # one per scheduled request
    assert sample("llm_d_epp_prefix_indexer_hit_ratio_count", **other) == 1
    assert sample("inference_extension_prefix_indexer_hit_ratio_count") == 3  # the legacy family sums them
    for family in ("hit_ratio", "hit_bytes"):
        assert (sample(f"llm_d_epp_prefix_indexer_{family}_sum", **me)
                + sample(f"llm_d_epp_prefix_indexer_{family}_sum", **other)
                == sample(f"inference_extension_prefix_indexer_{family}_sum"))
    with pytest.raises(ValueError, match="other labels"):
        handle.metrics.histogram("llm_d_epp_prefix_indexer_hit_ratio", "x", (1,), {"plugin_name": "x"})


def test_plugin_duration_uses_todays_extension_point_names():
    tel = Telemetry()
    observe = tel.plugin_observer()
    observe("PrepareData", "approx-prefix-cache-producer", "p", 0.001)
    observe("Scorer", "queue-scorer", "q", 0.001)
    labels = {"plugin_type": "approx-prefix-cache-producer", "plugin_name": "p"}
    assert value(tel, "llm_d_epp_plugin_duration_seconds_count", extension_point="DataProducer", **labels) == 1
    assert value(tel, "llm_d_epp_plugin_duration_seconds_count", extension_point="PrepareData", **labels) is None
    assert value(tel, "inference_extension_plugin_duration_seconds_count", extension_point="Scorer",
                 plugin_type="queue-scorer", plugin_name="q") == 1


def test_timed_plugins_record_through_the_bound_series_once_they_run():
    from epp.timing import timed

    class Producer:
        type_name, name = "approx-prefix-cache-producer", "p"

        def prepare_request_data(self, x: int) -> int:
            return x + 1

    tel = Telemetry()
    plugin = Producer()
    call = timed("PrepareData", plugin, plugin.prepare_request_data, tel.plugin_observer())
    assert call is not plugin.prepare_request_data  # wrapped: timed
    labels = {"extension_point": "DataProducer", "plugin_type": "approx-prefix-cache-producer", "plugin_name": "p"}
    assert value(tel, "llm_d_epp_plugin_duration_seconds_count", **labels) is None  # no series before a call
    assert call(1) == 2 and call(2) == 3
    assert value(tel, "llm_d_epp_plugin_duration_seconds_count", **labels) == 2
    assert value(tel, "inference_extension_plugin_duration_seconds_count", **labels) == 2
    tel.plugin_observer()("PrepareData", "approx-prefix-cache-producer", "p", 0.001)  # the unbound path: same series
    assert value(tel, "llm_d_epp_plugin_duration_seconds_count", **labels) == 3


async def test_model_rewrite_decisions_name_the_rule_and_not_the_header():
    tel = Telemetry()
    ds = Datastore()
    ds.upsert(EndpointSpec(name="ep0", address="10.0.0.1", port=8000))
    ds.set_rewrite(rewrite(["alias"], "served-v2", name="canary"))
    director = Director(ds, FirstEndpoint(), admission=OpenGate(), telemetry=tel)
    ctx = director.new_context(headers())
    await director.route(ctx, body("alias"), None)
    director.complete(ctx)
    decision = {"model_rewrite_name": "canary", "model_name": "alias", "target_model": "served-v2"}
    assert value(tel, "llm_d_epp_model_rewrite_decisions_total", **decision) == 1
    assert value(tel, "inference_extension_model_rewrite_decisions_total", **decision) == 1
    ctx = director.new_context({**headers(), "x-llm-d-model-name-rewrite": "pinned"})
    await director.route(ctx, body("alias"), None)
    director.complete(ctx)
    assert ctx.request.target_model == "pinned"
    assert value(tel, "llm_d_epp_model_rewrite_decisions_total", **decision) == 1  # the header is no rule
    assert "target_model=\"pinned\"" not in generate_latest(tel.registry).decode()


async def test_request_parsing_is_timed_per_parser():
    tel, _ds, _adm, director = flow_controlled_picker()
    await unary(director)
    parser = director.parsers.resolve("/v1/completions")
    assert value(tel, "llm_d_epp_plugin_duration_seconds_count", extension_point="RequestParsing",
                 plugin_type=parser.type_name, plugin_name=parser.name) == 1


def test_the_utilization_detector_reports_stale_endpoints():
    from prometheus_client import CollectorRegistry

    from epp.assembly import build_plugin
    from epp.framework import Endpoint, PluginHandle
    from epp.framework.metrics import PluginMetrics

    reg = CollectorRegistry()
    detector = build_plugin("utilization-detector", "util", None, PluginHandle(metrics=PluginMetrics(reg)), "t")
    fresh, stale, never = Endpoint("a", "10.0.0.1", 80), Endpoint("b", "10.0.0.2", 80), Endpoint("c", "10.0.0.3", 80)
    fresh.metrics = Metrics(update_time=time.monotonic(), ok=True)
    stale.metrics = Metrics(update_time=time.monotonic() - 60, ok=True)
    assert detector.saturation([fresh, stale, never]) >= 2 / 3
    text = generate_latest(reg).decode()
    assert_matches_reference(text, DETECTOR_FAMILIES)
    assert reg.get_sample_value("llm_d_epp_flow_control_stale_endpoints", {"detector": "util"}) == 2
    detector.saturation([])  # an empty pool is not a metrics failure
    assert reg.get_sample_value("llm_d_epp_flow_control_stale_endpoints", {"detector": "util"}) == 0
