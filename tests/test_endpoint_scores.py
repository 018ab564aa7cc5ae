"""--emit-endpoint-scores (reference pkg/epp/handlers/request.go generateMetadata, metadata/consts.go
DestinationEndpointScoresKey): the routing reply's envoy.lb dynamic metadata gains
x-gateway-destination-endpoint-scores, a struct "ip:port" -> number, the weighted total of every
endpoint the primary profile scored (picked or not). Off by default: nothing is collected and the
metadata carries the destination alone. Never an HTTP header."""

from __future__ import annotations

import pytest

from epp.assembly import load_plugin_set
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.framework import InferenceRequest, Metrics
from epp.options import parse_args
from epp.server import PickerServer
from tests.extproc import (
    BUFFERED,
    IPS,
    Harness,
    body_msg,
    completion,
    destination,
    headers_msg,
    read,
    send_request,
    set_headers,
    transport,  # noqa: F401 - the autouse fixture: every protocol test runs against both transports
)

SCORES = "x-gateway-destination-endpoint-scores"
# totals = 1 * queue-scorer (min-max inverse of the waiting queue) + 2 * (1 - KV utilisation)
CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: max-score-picker
"""
LOADS = ((0, 0.25), (5, 0.5), (10, 0.75))  # (waiting queue, KV utilisation) of IPS[0..2]
EXPECTED = {f"{IPS[0]}:8000": 1.0 + 1.5, f"{IPS[1]}:8000": 0.5 + 1.0, f"{IPS[2]}:8000": 0.0 + 0.5}


def load(datastore: Datastore, loads=LOADS) -> None:
    for e, (queue, kv) in zip(datastore.endpoints(), loads, strict=True):
        datastore.set_metrics(e, Metrics(waiting_queue_size=queue, kv_cache_usage_percent=kv, ok=True))


def harness(emit: bool) -> Harness:
    h = Harness(CONFIG)
    h.director.emit_endpoint_scores = emit
    h.pipeline.scheduler.collect_scores = emit
    load(h.datastore)
    return h


def lb(reply) -> dict:
    return dict(reply.dynamic_metadata.fields["envoy.lb"].struct_value.fields)


def scores(reply) -> dict[str, float]:
    return {k: v.number_value for k, v in lb(reply)[SCORES].struct_value.fields.items()}


async def route_fds(h: Harness, **headers_kw):
    call = h.stream()
    hdr, _ = await send_request(call, **headers_kw)
    assert hdr.WhichOneof("response") == "request_headers"
    call.cancel()
    return hdr


# ------------------------------------------------------------------ over both transports
async def test_scores_ride_next_to_the_destination_in_envoy_lb():
    async with harness(emit=True) as h:
        hdr = await route_fds(h)
        header, meta = destination(hdr)
        assert header == meta == f"{IPS[0]}:8000"  # the highest total
        assert scores(hdr) == EXPECTED  # every scored endpoint, the two the picker left out too
        assert all(v.WhichOneof("kind") == "number_value"
                   for v in lb(hdr)[SCORES].struct_value.fields.values())
        assert set(lb(hdr)) == {"x-gateway-destination-endpoint", SCORES}
        assert set(hdr.dynamic_metadata.fields) == {"envoy.lb"}
        # metadata only: no header carries the scores upstream
        assert not any("score" in k for k in set_headers(hdr.request_headers.response))
        await h.assert_released()


async def test_buffered_mode_scores_ride_on_the_body_reply():
    async with harness(emit=True) as h:
        call = h.stream()
        await call.write(headers_msg(BUFFERED))
        (cont,) = await read(call, 1)
        assert not cont.HasField("dynamic_metadata")
        await call.write(body_msg(completion(), True))
        (body_reply,) = await read(call, 1)
        assert body_reply.WhichOneof("response") == "request_body"
        assert destination(body_reply)[1] == f"{IPS[0]}:8000"
        assert scores(body_reply) == EXPECTED
        call.cancel()
        await h.assert_released()


async def test_off_by_default_the_metadata_carries_the_destination_alone():
    async with Harness(CONFIG) as h:  # no flag: neither the scheduler nor the director collects
        load(h.datastore)
        hdr = await route_fds(h)
        assert set(lb(hdr)) == {"x-gateway-destination-endpoint"}
        assert destination(hdr)[1] == f"{IPS[0]}:8000"
        await h.assert_released()


async def test_scores_are_per_request_and_cover_only_the_candidates_scored():
    async with harness(emit=True) as h:
        # a subset hint leaves two candidates: only they are scored
        subset = [f"{IPS[1]}:8000", f"{IPS[2]}:8000"]
        hdr = await route_fds(h, subset=subset)
        assert destination(hdr)[1] == f"{IPS[1]}:8000"
        # min-max queue over the two (5, 10) -> 1, 0
        assert scores(hdr) == {f"{IPS[1]}:8000": 1.0 + 1.0, f"{IPS[2]}:8000": 0.0 + 0.5}
        # new loads, new totals and a new pick
        load(h.datastore, ((0, 0.0), (10, 0.5), (5, 0.0)))
        again = await route_fds(h, subset=subset)
        assert destination(again)[1] == f"{IPS[2]}:8000"
        assert scores(again) == {f"{IPS[1]}:8000": 0.0 + 1.0, f"{IPS[2]}:8000": 1.0 + 2.0}
        await h.assert_released()


async def test_a_flag_on_reply_is_not_served_from_the_destination_cache():
    async with harness(emit=True) as h:
        first = await route_fds(h)
        load(h.datastore, ((0, 0.0), (10, 0.5), (10, 1.0)))
        second = await route_fds(h)
        assert destination(first)[1] == destination(second)[1] == f"{IPS[0]}:8000"
        assert scores(second) == {f"{IPS[0]}:8000": 3.0, f"{IPS[1]}:8000": 1.0, f"{IPS[2]}:8000": 0.0}
        assert scores(first) != scores(second)
        await h.assert_released()


# ------------------------------------------------------------------ scheduler / director / server
def request() -> InferenceRequest:
    return InferenceRequest(request_id="r", target_model="m1", incoming_model="m1", kind="completions",
                            prompt_text="hello", headers={})


def test_scheduler_collects_nothing_unless_asked():
    ds = Datastore()
    ds.upsert(EndpointSpec(name="v4", address="10.0.0.9", port=8000))
    ds.upsert(EndpointSpec(name="v6", address="fd00::1", port=8001))
    load(ds, ((0, 0.0), (4, 0.5)))
    ps = load_plugin_set(CONFIG)
    _, off = ps.run_cycle(request(), ds.endpoints(), commit=False)
    assert all(r is None or r.scores is None for r in off.profile_results.values())
    ps.scheduler.collect_scores = True
    _, on = ps.run_cycle(request(), ds.endpoints(), commit=False)
    # keys are the hostports the destination uses: IPv6 bracketed
    assert on.profile_results[on.primary_profile].scores == {"10.0.0.9:8000": 3.0, "[fd00::1]:8001": 1.0}


@pytest.mark.parametrize("argv, on", [([], False), (["--emit-endpoint-scores"], True),
                                      (["--emit-endpoint-scores=false"], False)])
def test_serve_flag_turns_on_both_collection_and_emission(argv, on):
    server = PickerServer(parse_args(["--endpoints=127.0.0.1:7", "--tracing=false", *argv]))
    assert server.director.emit_endpoint_scores is on
    assert server.pipeline.scheduler.collect_scores is on

