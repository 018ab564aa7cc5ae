"""The director against hostile requests: output budgets, reused request ids, log
injection and made-up model names (issue 8 findings 5, 7, 10, 11)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from epp.assembly import load_plugin_set
from epp.datalayer.datastore import Datastore, EndpointSpec, Objective
from epp.errors import InferenceError, service_unavailable
from epp.flowcontrol.admission import release_once
from epp.framework import CycleState, Endpoint, InferenceRequest, Metrics, ProfileRunResult, SchedulingResult
from epp.logsafe import MAX_LOGGED_CHARS, clean
from epp.requestcontrol.director import Director, RequestContext
from epp.telemetry import DEFAULT_MAX_MODEL_LABELS, OVERFLOW_MODEL_LABEL, Telemetry, pool_models
from tests.helpers import rewrite

ACTIVE_REQUEST_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: active-request-scorer
- type: max-score-picker
"""


class OpenGate:
    """Admission that admits everything and counts what is held."""

    def __init__(self) -> None:
        self.held = 0

    async def admit(self, request: InferenceRequest, candidates: Sequence[Endpoint]):
        self.held += 1
        return release_once(self._release)

    def _release(self) -> None:
        self.held -= 1


class FirstEndpoint:
    """A plugin set that picks the first candidate and has no hooks."""

    prefetches = ()

    async def prefetch(self, request) -> None: ...

    def run_cycle(self, request, candidates, *, trace=None, commit=True):
        if not candidates:
            raise service_unavailable("no candidate endpoints for the request")
        return CycleState(), SchedulingResult({"default": ProfileRunResult([candidates[0]])}, "default")

    def response_received(self, request, response, target) -> None: ...

    def response_streaming(self, request, response, target) -> None: ...

    def response_complete(self, request, response, target) -> None: ...


def datastore(n: int = 2) -> Datastore:
    ds = Datastore()
    for i in range(n):
        ds.upsert(EndpointSpec(name=f"ep{i}", address=f"10.0.0.{i + 1}", port=8000))
    return ds


def body(model: str = "m", **fields) -> bytes:
    return orjson.dumps({"model": model, "prompt": "hello world", **fields})


def headers(request_id: str | None = None) -> dict[str, str]:
    h = {":path": "/v1/completions", ":method": "POST"}
    if request_id is not None:
        h["x-request-id"] = request_id
    return h


async def route(director: Director, raw: bytes, request_id: str | None = None) -> RequestContext:
    ctx = director.new_context(headers(request_id))
    try:
        await director.route(ctx, raw, None)
    except InferenceError as e:
        director.failed(ctx, e)
        raise
    return ctx


def finish(director: Director, ctx: RequestContext) -> None:
    director.response_headers(ctx, 200, {"content-type": "application/json"}, "")
    director.response_body(ctx, b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}', True)
    director.complete(ctx)


def assert_nothing_in_flight(ds: Datastore, gate: OpenGate) -> None:
    assert [(e.in_flight, e.in_flight_tokens) for e in ds.endpoints()] == [(0, 0)] * len(ds.endpoints())
    assert gate.held == 0


# ------------------------------------------------------------------ finding 7: output budgets
@pytest.mark.parametrize("raw", [
    body(max_tokens=10**18), body(max_tokens=-10**18), body(max_completion_tokens=-1),
    b'{"model": "m", "prompt": "p", "max_tokens": -1e18}', body(max_tokens=2**31), body(max_tokens="100"),
])
async def test_absurd_max_tokens_is_400_and_leaves_nothing_in_flight(raw):
    ds, gate = datastore(), OpenGate()
    director = Director(ds, FirstEndpoint(), admission=gate)
    with pytest.raises(InferenceError) as e:
        await route(director, raw)
    assert e.value.http_status == 400 and "max_" in e.value.message
    assert_nothing_in_flight(ds, gate)


async def test_in_flight_releases_exactly_what_it_added():
    ds, gate = datastore(1), OpenGate()
    director = Director(ds, FirstEndpoint(), admission=gate)
    big = await route(director, body(max_tokens=2**31 - 1))
    small = await route(director, body(max_tokens=5))
    (ep,) = ds.endpoints()
    assert (ep.in_flight, ep.in_flight_tokens) == (2, 2**31 - 1 + 5 + 2 * 2)  # "hello world" = 2 tokens
    finish(director, big)
    assert (ep.in_flight, ep.in_flight_tokens) == (1, 5 + 2)
    finish(director, small)
    director.complete(small)  # a second completion changes nothing
    assert_nothing_in_flight(ds, gate)


# ------------------------------------------------------------------ finding 10: client request ids
async def test_a_reused_request_id_does_not_release_the_first_requests_count():
    ds, gate = datastore(1), OpenGate()
    plugins = load_plugin_set(ACTIVE_REQUEST_CONFIG)
    load = plugins.plugins["inflight-load-producer"]  # what active-request-scorer reads
    director = Director(ds, plugins, admission=gate)
    (ep,) = ds.endpoints()
    first = await route(director, body(), "dup")
    second = await route(director, body(), "dup")
    assert load.requests[ep] == 2  # the second did not replace the first
    assert first.request.request_id != second.request.request_id
    assert first.request.headers["x-request-id"] == second.request.headers["x-request-id"] == "dup"
    assert first.request_id == second.request_id == "dup"  # logs still show the client's id
    finish(director, second)
    assert load.requests[ep] == 1  # the first is still counted
    finish(director, first)
    assert ep not in load.requests
    assert_nothing_in_flight(ds, gate)


async def test_generated_request_id_is_set_on_the_request_headers():
    director = Director(datastore(), FirstEndpoint(), admission=OpenGate())
    ctx = director.new_context(headers())
    assert ctx.generated_request_id and ctx.headers["x-request-id"] == ctx.request_id
    assert ctx.key and ctx.key != ctx.request_id


# ------------------------------------------------------------------ finding 11: log injection
def test_clean_escapes_control_characters_and_bounds_length():
    assert clean("llama-3 8b/instruct") == "llama-3 8b/instruct"
    assert clean("m\nINFO forged line\r\x1b[31m\u2028") == "m\\x0aINFO forged line\\x0d\\x1b[31m\\u2028"
    assert clean("a\\x0ab") == "a\\\\x0ab"  # a literal backslash cannot pose as an escape
    long = clean("x" * 10_000)
    assert long == "x" * MAX_LOGGED_CHARS + f"...({10_000 - MAX_LOGGED_CHARS} more chars)"


async def test_client_strings_cannot_forge_log_lines(caplog):
    ds, gate = Datastore(), OpenGate()  # no endpoints: the request fails and is logged
    director = Director(ds, FirstEndpoint(), admission=gate)
    caplog.set_level(logging.INFO, logger="epp.requestcontrol.director")
    with pytest.raises(InferenceError):
        await route(director, body("m\nERROR epp: forged"), "rid\nWARNING forged too")
    (record,) = [r for r in caplog.records if r.name == "epp.requestcontrol.director"]
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line
    assert "model=m\\x0aERROR epp: forged" in line and "request_id=rid\\x0aWARNING forged too" in line


# ------------------------------------------------------------------ finding 5: label cardinality
def model_labels(registry) -> set[str]:
    text = generate_latest(registry).decode()
    return {s.labels[k] for f in text_string_to_metric_families(text) for s in f.samples
            for k in ("model_name", "target_model_name") if k in s.labels}


def known_pool() -> Datastore:
    ds = datastore(1)
    ds.set_rewrite(rewrite(["alias"], "served-v2"))
    ds.set_objective(Objective("batch", priority=-1))
    ep = ds.endpoints()[0]
    ds.set_metrics(ep, Metrics(running_lora_adapters=frozenset({"lora-a"}),
                               waiting_lora_adapters=frozenset({"lora-b"})))
    return ds


def test_pool_models_are_rewrites_objectives_and_adapters():
    assert pool_models(known_pool()) == {"alias", "served-v2", "batch", "lora-a", "lora-b"}


async def test_made_up_model_names_leave_metrics_bounded():
    ds, gate = known_pool(), OpenGate()
    telemetry = Telemetry(max_model_labels=20)
    director = Director(ds, FirstEndpoint(), admission=gate, telemetry=telemetry)
    for i in range(3000):
        finish(director, await route(director, body(f"made-up-{i}")))
    for model in ("lora-a", "alias", "lora-b"):  # known after the flood: still their own label
        finish(director, await route(director, body(model)))
    labels = model_labels(telemetry.registry)
    assert OVERFLOW_MODEL_LABEL in labels
    assert {"lora-a", "lora-b", "alias", "served-v2"} <= labels
    assert len(labels - {"lora-a", "lora-b", "alias", "served-v2", OVERFLOW_MODEL_LABEL}) == 20
    size = len(generate_latest(telemetry.registry))
    assert size < 1_300_000, size  # ~45 KB of series per model label value, legacy + llm_d_epp_* (3,000 unbounded: ~135 MB)
    assert_nothing_in_flight(ds, gate)


async def test_default_label_bound_keeps_metrics_small():
    ds, gate = datastore(1), OpenGate()
    telemetry = Telemetry()
    director = Director(ds, FirstEndpoint(), admission=gate, telemetry=telemetry)
    for i in range(3000):
        finish(director, await route(director, body(f"made-up-{i}")))
    labels = model_labels(telemetry.registry)
    assert len(labels) == telemetry.model_labels.limit + 1 == DEFAULT_MAX_MODEL_LABELS + 1 == 33
    size = len(generate_latest(telemetry.registry))
    assert size < 1_700_000, size  # 33 label values of ~45 KB (legacy + llm_d_epp_* families)
