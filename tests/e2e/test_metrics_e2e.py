"""/metrics of a running `epp serve` after real requests through the real Envoy: the
llm_d_epp_* and legacy families with the reference's types, label names and buckets
(tests/fixtures/reference/metrics.txt)."""

from __future__ import annotations

import pytest

from devstack.launch import wait_until
from tests.e2e.test_routing import check_openai_round_trip, client
from tests.test_metrics_reference import (
    DETECTOR_FAMILIES,
    EVICTION_FAMILIES,
    IMPLEMENTED,
    PREFIX_FAMILIES,
    STREAM_FAMILIES,
    assert_matches_reference,
    exposition,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# What four requests (completions and chat, streamed and not) must have filled.
AFTER_REQUESTS = {
    "llm_d_epp_request_total", "llm_d_epp_request_duration_seconds", "llm_d_epp_request_size_bytes",
    "llm_d_epp_response_size_bytes", "llm_d_epp_request_input_tokens", "llm_d_epp_request_output_tokens",
    "llm_d_epp_request_running", "llm_d_epp_request_ntpot_seconds", "llm_d_epp_request_ttft_seconds",
    "llm_d_epp_request_streaming_tpot_seconds", "llm_d_epp_request_streaming_itl_seconds",
    "llm_d_epp_average_kv_cache_utilization", "llm_d_epp_average_queue_size", "llm_d_epp_average_running_requests",
    "llm_d_epp_std_dev_kv_cache_utilization", "llm_d_epp_std_dev_queue_size", "llm_d_epp_std_dev_running_requests",
    "llm_d_epp_ready_endpoints", "llm_d_epp_per_endpoint_queue_size", "llm_d_epp_scheduler_e2e_duration_seconds",
    "llm_d_epp_scheduler_attempts_total", "llm_d_epp_plugin_duration_seconds",
    "llm_d_epp_request_processing_duration_seconds", "llm_d_epp_response_processing_duration_seconds",
    "llm_d_epp_info", "llm_d_epp_flow_control_pool_saturation", "inference_objective_request_total",
    "inference_objective_request_duration_seconds", "inference_objective_running_requests",
    "inference_pool_average_kv_cache_utilization", "inference_pool_ready_pods",
    "inference_extension_scheduler_attempts_total", "inference_extension_plugin_duration_seconds",
    "llm_d_epp_extproc_streams_inflight", "llm_d_epp_extproc_stream_duration_seconds",
    "llm_d_epp_extproc_streams_total", "llm_d_epp_prefix_indexer_size",
}


def test_metrics_after_requests_through_envoy_have_the_references_shape(module_sim_servers, picker, envoy):
    sims = module_sim_servers
    p = picker(endpoints=sims.hostports, extra_flags=["--enable-grpc-stream-metrics"])
    env = envoy("full-duplex", p)
    wait_until(lambda: 'llm_d_epp_std_dev_queue_size{name="static"}' in p.metrics(), 10, "pool gauges")
    check_openai_round_trip(client(env), "m1")
    # one page with the stream metrics and the pool gauges (written only while some endpoint's
    # scraped metrics are fresh, so a later page of a stalled machine could lack them)
    pages: list[str] = []
    wait_until(lambda: pages.append(p.metrics()) or ("llm_d_epp_extproc_streams_total{" in pages[-1] and
                                                     'llm_d_epp_std_dev_queue_size{name="static"}' in pages[-1]),
               10, "stream metrics and pool gauges on one page")
    text = pages[-1]
    present = assert_matches_reference(text, AFTER_REQUESTS)
    # every family is on the page (the default config's prefix producer's too), nothing else
    assert present == IMPLEMENTED | STREAM_FAMILIES | PREFIX_FAMILIES | DETECTOR_FAMILIES | EVICTION_FAMILIES
    page = exposition(text)
    assert {tuple(sorted(s)) for s in page["llm_d_epp_request_ttft_seconds"][1]} == {
        ("fairness_id", "model_name", "priority", "streaming", "target_model_name")}
    req = 'model_name="m1",priority="0",target_model_name="m1"'
    assert f'llm_d_epp_request_total{{fairness_id="default-flow",{req}}} 4.0' in text
    assert ('llm_d_epp_request_ttft_seconds_count{fairness_id="default-flow",model_name="m1",priority="0",'
            'streaming="true",target_model_name="m1"} 2.0') in text
    assert ('llm_d_epp_request_ttft_seconds_count{fairness_id="default-flow",model_name="m1",priority="0",'
            'streaming="false",target_model_name="m1"} 2.0') in text
    assert f'llm_d_epp_request_streaming_tpot_seconds_count{{fairness_id="default-flow",{req}}} 2.0' in text
    assert 'inference_objective_request_total{model_name="m1",priority="0",target_model_name="m1"} 4.0' in text
    assert 'llm_d_epp_extproc_streams_total{code="OK"}' in text
