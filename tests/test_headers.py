"""Control headers (canonical x-llm-d-* names first, the old x-gateway-* names still
honoured), their stripping from the forwarded request, and x-llm-d-request-dropped-reason
on every rejection by admission, flow control or scheduling."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse

from epp.datalayer.datastore import Datastore, EndpointSpec, Objective
from epp.errors import (
    DROPPED_REASON_HEADER,
    DROPPED_REASONS,
    InferenceError,
    resource_exhausted,
    service_unavailable,
)
from epp.handlers.protocol import DESTINATION_HEADER, SYSTEM_HEADERS
from epp.handlers.replies import REQUEST_BODY, RoutingReplies, immediate_reply
from epp.requestcontrol import headers as control
from epp.requestcontrol.director import Director, RequestContext
from tests.helpers import until
from tests.test_admission import controller, flow_config, pool, req
from tests.test_director import FirstEndpoint, OpenGate

OLD_OBJECTIVE = "x-gateway-inference-objective"
OLD_FAIRNESS = "x-gateway-inference-fairness-id"
OLD_REWRITE = "x-gateway-model-name-rewrite"


# --------------------------------------------------------------------------- the table
def test_canonical_name_wins_then_the_old_one_is_read():
    assert control.objective({OLD_OBJECTIVE: "old"}) == "old"
    assert control.objective({control.OBJECTIVE: "new", OLD_OBJECTIVE: "old"}) == "new"
    assert control.objective({control.OBJECTIVE: "", OLD_OBJECTIVE: "old"}) == ""  # present canonical wins
    assert control.objective({}) == ""
    assert control.fairness_id({OLD_FAIRNESS: "t-old"}) == "t-old"
    assert control.fairness_id({control.FAIRNESS_ID: "t", OLD_FAIRNESS: "t-old"}) == "t"
    assert control.fairness_id({}) == control.DEFAULT_FAIRNESS_ID == "default-flow"
    assert control.model_name_rewrite({OLD_REWRITE: "a", control.MODEL_NAME_REWRITE: "b"}) == "b"
    assert control.header({"x-slo-ttft-ms": "200"}, control.SLO_TTFT_MS) == "200"
    assert control.SESSION_ID == "x-session-id"


def test_every_name_of_a_control_header_and_every_injected_header_is_stripped():
    assert set(control.STRIPPED) == {
        "x-llm-d-inference-objective", "x-gateway-inference-objective", "x-llm-d-inference-fairness-id",
        "x-gateway-inference-fairness-id", "x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite",
        "x-gateway-destination-endpoint-subset", "x-llm-d-slo-ttft-ms", "x-slo-ttft-ms", "x-llm-d-slo-tpot-ms",
        "x-slo-tpot-ms", "x-llm-d-video-fps", "x-llm-d-video-duration-seconds", "x-llm-d-video-resolution",
        "x-gateway-destination-endpoint", "x-gateway-destination-endpoint-served", "x-llm-d-request-dropped-reason"}
    assert set(control.STRIPPED) <= set(SYSTEM_HEADERS)


def test_a_clients_copies_of_the_sidecar_target_headers_are_removed():
    # The routing sidecar trusts these: only the picker may set them.
    assert {"x-prefiller-host-port", "x-encoder-hosts-ports", "x-data-parallel-host-port"} <= set(SYSTEM_HEADERS)


def test_the_forwarded_request_loses_the_control_headers():
    ctx = RequestContext(headers={"x-llm-d-inference-objective": "o", "x-gateway-inference-objective": "o",
                                  "x-llm-d-request-dropped-reason": "forged", "x-session-id": "keep",
                                  "authorization": "keep"})
    ctx.destination = "10.0.0.1:8000"
    reply = ProcessingResponse.FromString(RoutingReplies().reply(ctx, REQUEST_BODY, -1, None))
    mutation = reply.request_body.response.header_mutation
    assert sorted(mutation.remove_headers) == ["x-gateway-inference-objective", "x-llm-d-inference-objective",
                                               "x-llm-d-request-dropped-reason"]
    assert [h.header.key for h in mutation.set_headers] == [DESTINATION_HEADER]


# --------------------------------------------------------------------------- director
def director_with_objectives() -> tuple[Director, Datastore]:
    ds = Datastore()
    ds.upsert(EndpointSpec(name="ep0", address="10.0.0.1", port=8000))
    ds.set_objective(Objective(name="batch", priority=-1))
    ds.set_objective(Objective(name="interactive", priority=10))
    return Director(ds, FirstEndpoint(), admission=OpenGate()), ds


@pytest.mark.parametrize(("headers", "priority", "fairness"), [
    ({"x-llm-d-inference-objective": "batch"}, -1, "default-flow"),
    ({"x-gateway-inference-objective": "batch"}, -1, "default-flow"),
    ({"x-llm-d-inference-objective": "interactive", "x-gateway-inference-objective": "batch"}, 10, "default-flow"),
    ({"x-llm-d-inference-fairness-id": "tenant", "x-gateway-inference-fairness-id": "old"}, 0, "tenant"),
    ({"x-gateway-inference-fairness-id": "old"}, 0, "old"),
])
def test_director_reads_objective_and_fairness_by_either_name(headers, priority, fairness):
    director, _ = director_with_objectives()
    ctx = director.new_context({":path": "/v1/completions", **headers})
    r = director.prepare(ctx, orjson.dumps({"model": "m", "prompt": "p"}))
    assert (r.priority, r.fairness_id) == (priority, fairness)


@pytest.mark.parametrize("name", ["x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"])
async def test_model_name_rewrite_header_by_either_name(name):
    director, _ = director_with_objectives()
    ctx = director.new_context({":path": "/v1/messages", name: "served-model"})
    await director.route(ctx, orjson.dumps({"model": "alias", "max_tokens": 5,
                                            "messages": [{"role": "user", "content": "x"}]}), None)
    assert (ctx.request.incoming_model, ctx.request.target_model) == ("alias", "served-model")
    assert orjson.loads(ctx.new_body)["model"] == "served-model"  # the Anthropic body is rewritten too
    director.complete(ctx)


async def test_default_chain_routes_messages_generate_and_any_other_body():
    director, _ = director_with_objectives()
    for path, raw, kind in (
            ("/v1/messages", orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}), "messages"),
            ("/inference/v1/generate", orjson.dumps({"model": "m", "token_ids": [1, 2]}), "generate"),
            ("/v1/rerank", b"\x01binary, not JSON", "passthrough"),
            ("/v1/chat/completions", orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
             "chat")):
        ctx = director.new_context({":path": path})
        await director.route(ctx, raw, None)
        assert ctx.request.kind == kind and ctx.destination == "10.0.0.1:8000"
        assert ctx.new_body is None  # no rewrite: the body goes as received
        director.complete(ctx)


async def test_configured_parsers_without_fallback_refuse_other_paths():
    ds = Datastore()
    ds.upsert(EndpointSpec(name="ep0", address="10.0.0.1", port=8000))
    from epp.framework.registry import plugin_class

    director = Director(ds, FirstEndpoint(), admission=OpenGate(),
                        parsers=[plugin_class("openai-parser")("openai", None, None)])
    ctx = director.new_context({":path": "/v1/messages"})
    with pytest.raises(InferenceError) as e:
        await director.route(ctx, b'{"model": "m", "messages": []}', None)
    assert e.value.http_status == 400 and "no parser registered" in e.value.message


# --------------------------------------------------------------------------- dropped reason
def test_inference_error_carries_the_reason_as_a_response_header():
    e = resource_exhausted("busy", "rejected-saturated")
    assert e.headers == {DROPPED_REASON_HEADER: "rejected-saturated"}
    assert InferenceError("BadRequest", "x").headers == {}
    with pytest.raises(ValueError, match="unknown dropped reason"):
        service_unavailable("x", "rejected-because")
    assert DROPPED_REASONS == {"rejected-saturated", "rejected-no-endpoints", "rejected-ttl-expired",
                               "rejected-context-cancelled", "rejected-shutting-down", "evicted",
                               "evicted-queue-pressure", "evicted-priority"}
    reply = ProcessingResponse.FromString(immediate_reply(e)).immediate_response
    assert reply.status.code == 429
    assert {h.header.key: h.header.raw_value for h in reply.headers.set_headers} == {
        "content-type": b"text/plain", DROPPED_REASON_HEADER: b"rejected-saturated"}


async def reason_of(awaitable) -> tuple[int, str]:
    with pytest.raises(InferenceError) as e:
        await awaitable
    return e.value.http_status, e.value.reason


async def test_admission_rejections_carry_their_reason():
    from tests.test_admission import DETECTOR

    assert await reason_of(controller(DETECTOR).admit(req("a", priority=-1), pool(True))) == (
        429, "rejected-saturated")
    assert await reason_of(controller(flow_config(ttl="30ms")).admit(req("b"), pool(True))) == (
        429, "rejected-ttl-expired")  # the reference's answer with endpoints (requestcontrol/admission.go)
    full = controller(flow_config(bands="[{priority: 0, maxRequests: 1}]"))
    endpoints = pool(True)
    queued = asyncio.create_task(full.admit(req("c"), endpoints))
    await until(lambda: full.queue_size == 1)
    assert await reason_of(full.admit(req("d"), endpoints)) == (429, "rejected-saturated")
    await full.close()
    assert await reason_of(queued) == (503, "rejected-shutting-down")


async def test_no_endpoints_and_emptied_candidates_carry_their_reason():
    from epp.assembly import load_plugin_set

    ds = Datastore()
    ds.upsert(EndpointSpec(name="ep0", address="10.0.0.1", port=8000))
    director = Director(ds, FirstEndpoint(), admission=OpenGate())
    raw = orjson.dumps({"model": "m", "prompt": "p"})
    assert await reason_of(director.route(director.new_context({}), raw, ["10.9.9.9:80"])) == (
        503, "rejected-no-endpoints")
    empty = Director(Datastore(), load_plugin_set(None), admission=OpenGate())
    assert await reason_of(empty.route(empty.new_context({}), raw, None)) == (503, "rejected-no-endpoints")
    nobody = Director(ds, load_plugin_set(TESTING_FILTER), admission=OpenGate())
    ctx = nobody.new_context({"test-epp-endpoint-selection": "10.8.8.8"})
    assert await reason_of(nobody.route(ctx, raw, None)) == (429, "rejected-saturated")


TESTING_FILTER = """
plugins:
- type: header-based-testing-filter
- type: max-score-picker
schedulingProfiles: [{name: default, plugins: [{pluginRef: header-based-testing-filter},
                                               {pluginRef: max-score-picker}]}]
"""


async def test_a_rewrite_of_a_body_too_deep_to_write_back_is_400():
    director, _ = director_with_objectives()
    ctx = director.new_context({":path": "/v1/completions", "x-llm-d-model-name-rewrite": "other"})
    raw = b'{"model": "m", "prompt": "p", "extra": ' + b"[" * 600 + b"]" * 600 + b"}"
    with pytest.raises(InferenceError) as e:
        await director.route(ctx, raw, None)
    assert e.value.http_status == 400 and "nests too deeply" in e.value.message
