"""The llm-d wide-EP guide's configuration (tests/fixtures/reference/configs/llm-d-wide-ep-lws.yaml)
started unchanged with its chart's flags (the guide's base values: --v=2, --tracing=false) plus
--allow-experimental-plugins, which its Alpha disaggregatedset-rollout-screener needs in the
reference too; the real Envoy in front; simulator prefill and decode servers labelled as the
DisaggregatedSet controller labels its pods, mid-rollout: revision A has both roles, revision B
only a decode pod. Every request is pinned to A (prefilled and decoded there, counted by the
servers), the response names the revision, and a request that asks for B is refused (503)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack.launch import wait_until
from tests.e2e.api import endpoint, write_endpoints
from tests.e2e.conftest import metric_sum, post
from tests.e2e.test_reference_configs import chart_args, localise

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUIDE = Path(__file__).parents[1] / "fixtures" / "reference" / "configs" / "llm-d-wide-ep-lws.yaml"
SET = {"disaggregatedset.x-k8s.io/name": "wide-ep-lws-nvidia-gpu-vllm"}


def pod_labels(revision: str, role: str) -> dict[str, str]:
    return {**SET, "disaggregatedset.x-k8s.io/revision": revision, "disaggregatedset.x-k8s.io/role": role,
            "llm-d.ai/role": role}


def served(sims, i: int, role: str) -> float:
    return metric_sum(sims.metrics(i), "sim_requests_total", role=role)


def test_wide_ep_guide_pins_a_rollout_revision_through_envoy(sim_servers, picker, envoy, tmp_path):
    prefill, decode = sim_servers(1, role="prefill"), sim_servers(2, roles="decode,decode")
    endpoints = write_endpoints(tmp_path / "endpoints.yaml", [
        endpoint("p-a", prefill.ports[0], pod_labels("A", "prefill")),
        endpoint("d-a", decode.ports[0], pod_labels("A", "decode")),
        endpoint("d-b", decode.ports[1], pod_labels("B", "decode"))])
    flags = [*localise(chart_args("llm-d-guide", "optimized-baseline"), GUIDE), "--allow-experimental-plugins"]
    p = picker(endpoints_file=endpoints, extra_flags=flags)
    url = f"{envoy('full-duplex', p).url}/v1/completions"

    for k in range(4):
        status, headers, body = post(url, {"model": "m1", "prompt": f"wide-ep request {k}", "max_tokens": 3},
                                     timeout=60)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3, body
        assert headers.get("x-llm-d-disagg-revision") == "A"
    wait_until(lambda: served(prefill, 0, "prefill") == 4 and served(decode, 0, "decode") == 4, 20,
               "revision A's prefill and decode servers to count every request")
    assert served(decode, 1, "decode") + served(decode, 1, "both") == 0  # B's lone decode pod got nothing

    status, _, body = post(url, {"model": "m1", "prompt": "pinned to B", "max_tokens": 3},
                           headers={"x-llm-d-disagg-revision": "B"})
    assert status == 503, body
    wait_until(lambda: metric_sum(p.metrics(), "llm_d_epp_disaggregatedset_strict_revision_no_match_total") == 1,
               10, "the strict-revision miss to be counted")
    assert metric_sum(p.metrics(), "llm_d_epp_disaggregatedset_revision_gating_share", revision="A") == 1.0
