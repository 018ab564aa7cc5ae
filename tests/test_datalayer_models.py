"""models-data-source + models-data-extractor: each endpoint's /v1/models into
Endpoint.served (base models, LoRA adapters with their parent), used by LoRA affinity and
the pool's known model names; hostile answers are bounded, per-endpoint failures."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from epp.datalayer import models as models_module
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.datalayer.models import MAX_MODEL_ENTRIES, MAX_MODEL_NAME, ModelsError, parse_models
from epp.datalayer.runtime import DataLayer
from epp.framework import CycleState, InferenceRequest
from epp.framework.types import ServedModels
from epp.telemetry import pool_models
from tests.helpers import plugin
from tests.servers import RawServer, eventually, length_response

VLLM_MODELS = json.dumps({"object": "list", "data": [
    {"id": "base", "object": "model", "created": 1, "owned_by": "vllm", "root": "base", "parent": None,
     "max_model_len": 2048},
    {"id": "sql-lora", "object": "model", "created": 1, "owned_by": "vllm", "root": "/adapters/sql",
     "parent": "base", "max_model_len": 2048},
]}).encode()


def test_vllm_answer_lists_base_models_and_adapters_with_their_parent():
    served, dropped = parse_models(VLLM_MODELS, 5.0)
    assert served.models == {"base"} and dict(served.adapters) == {"sql-lora": "base"}
    assert served.ok and served.update_time == 5.0 and dropped == 0
    assert served.names() == {"base", "sql-lora"}
    minimal, _ = parse_models(b'{"data": [{"id": "m"}]}', 1.0)  # only `id` is required
    assert minimal.models == {"m"} and not minimal.adapters


@pytest.mark.parametrize("body,message", [
    (b"<html>nope</html>", "not JSON"),
    (b'["base"]', "expected a JSON object with 'data', got list"),
    (b'{"object": "list"}', "'data' must be a list of models, got NoneType"),
    (b'{"data": "base"}', "'data' must be a list of models, got str"),
    (b'{"data": [42]}', "'data' entries must be objects, got int"),
    (b'{"data": [{"name": "m"}]}', "a model entry has no 'id' string"),
    (b'{"data": [{"id": "a", "parent": 7}]}', "model 'a': 'parent' must be a string or null"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nesting past the parser's depth limit
    (b'{"data": [{"id": "\xff\xfe"}]}', "not JSON"),  # not UTF-8
])
def test_malformed_answers_are_one_clear_error(body, message):
    with pytest.raises(ModelsError) as e:
        parse_models(body, 1.0)
    assert message in str(e.value) and len(str(e.value)) < 300


def test_entries_and_names_are_bounded():
    many = {"data": [{"id": f"m{i}", "parent": "base" if i % 2 else None} for i in range(MAX_MODEL_ENTRIES + 500)]}
    served, dropped = parse_models(json.dumps(many).encode(), 1.0)
    assert len(served.models) + len(served.adapters) == MAX_MODEL_ENTRIES and dropped == 500
    long_name = {"data": [{"id": "x" * (MAX_MODEL_NAME + 1)}, {"id": "ok", "parent": "p" * (MAX_MODEL_NAME + 1)},
                          {"id": "fine"}]}
    served, dropped = parse_models(json.dumps(long_name).encode(), 1.0)
    assert served.names() == {"fine"} and dropped == 2


# --------------------------------------------------------------------------- polling
class ModelsServer(RawServer):
    """/v1/models in a mode: "ok", "garbage", "huge" (over the body cap, announced),
    "endless" (chunked, never ending), "huge-chunked", "status" (500)."""

    def __init__(self, body: bytes = VLLM_MODELS) -> None:
        super().__init__(self._respond)
        self.body = body
        self.mode = "ok"
        self.paths: list[str] = []

    async def _respond(self, reader, writer, conn, n, head) -> bool:
        self.paths.append(head.split(b" ", 2)[1].decode())
        mode = self.mode
        if mode == "ok":
            writer.write(length_response(self.body, extra=b"Content-Type: application/json\r\n"))
        elif mode == "garbage":
            writer.write(length_response(b'{"data": {"oops": true}}'))
        elif mode == "status":
            writer.write(length_response(b"boom", "500 Internal Server Error"))
        elif mode == "huge":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
            writer.write(b"{" * 65536)
        elif mode in ("endless", "huge-chunked"):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            # endless: a trickle that never reaches the cap, so the poll's deadline ends it;
            # huge-chunked: as fast as the client reads, so the body cap ends it.
            chunk = b'{"id": "a"},' * (10 if mode == "endless" else 1000)
            try:
                while True:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    if mode == "endless":
                        await asyncio.sleep(0.05)
            except ConnectionError:
                return False
        await writer.drain()
        return True


async def run_models(servers: list[ModelsServer], params: dict | None = None) -> tuple[Datastore, DataLayer]:
    ds = Datastore()
    layer = DataLayer(ds, base_interval=0.02, timeout=0.5)
    layer.bind(plugin("models-data-source", params), [plugin("models-data-extractor")], "dataLayer.sources[0]")
    ds.replace_all([EndpointSpec(f"ep{i}", "127.0.0.1", s.port) for i, s in enumerate(servers)])
    await layer.start()
    return ds, layer


async def test_models_are_polled_and_published_per_endpoint():
    async with ModelsServer() as server:
        ds, layer = await run_models([server])
        try:
            (ep,) = ds.endpoints()
            await eventually(lambda: ep.served.ok, "the model list")
            assert dict(ep.served.adapters) == {"sql-lora": "base"} and server.paths[0] == "/v1/models"
            assert {"base", "sql-lora"} <= pool_models(ds)
            # An adapter unloaded on the server leaves the endpoint's set at the next poll.
            server.body = b'{"object": "list", "data": [{"id": "base"}]}'
            await eventually(lambda: not ep.served.adapters, "the adapter gone")
            assert ep.served.models == {"base"} and ep.served.ok
        finally:
            await layer.stop()


@pytest.mark.parametrize("mode", ["garbage", "status", "huge", "endless", "huge-chunked"])
async def test_hostile_answers_fail_per_endpoint_bounded_without_traceback(mode, caplog, monkeypatch):
    """A bad /v1/models on one endpoint marks only its model list not ok (keeping the last
    good one), with one warning naming the endpoint; the other endpoint is polled on."""
    monkeypatch.setattr(models_module, "MAX_MODELS_BODY", 64 << 10)
    async with ModelsServer() as bad, ModelsServer() as good:
        with caplog.at_level(logging.INFO, logger="epp.datalayer"):
            ds, layer = await run_models([bad, good])
            errors: set[tuple[str, str, str]] = set()
            layer.on_error(lambda *e: errors.add(e))
            try:
                ep_bad, ep_good = ds.endpoints()
                await eventually(lambda: ep_bad.served.ok and ep_good.served.ok, "both lists")
                bad.mode = mode
                poller = layer.pollers[0]
                stats = poller.stats(ep_bad)
                await eventually(lambda: stats.failed >= 2, f"{mode} to fail")
                assert not ep_bad.served.ok and dict(ep_bad.served.adapters) == {"sql-lora": "base"}
                polled = len(good.paths)
                await eventually(lambda: len(good.paths) >= polled + 3, "the good endpoint polled on")
                assert ep_good.served.ok
                bad.mode = "ok"
                await eventually(lambda: ep_bad.served.ok, "recovery")
            finally:
                await layer.stop()
    lines = [r for r in caplog.records if r.name == "epp.datalayer"]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "models poll of ep0" in warnings[0], warnings
    assert any("recovered" in r.getMessage() for r in lines)
    expected = {"garbage": "'data' must be a list", "status": "HTTP 500", "huge": "exceeds",
                "endless": "timed out", "huge-chunked": "exceeds"}[mode]
    assert expected in warnings[0], warnings[0]
    kind = "extract" if mode == "garbage" else "poll"  # the answer came but was unusable, or it did not come
    assert errors == {(kind, "models-data-source", "models-data-extractor")}


def test_body_cap_applies_to_the_client(monkeypatch):
    ds = Datastore()
    layer = DataLayer(ds)
    layer.bind(plugin("models-data-source"), [plugin("models-data-extractor")])
    poller = layer.pollers[0]
    ep = ds.upsert(EndpointSpec("a", "127.0.0.1", 8000))
    assert poller._client(ep).max_body == models_module.MAX_MODELS_BODY  # noqa: SLF001


# --------------------------------------------------------------------------- consumers
def request(model: str) -> InferenceRequest:
    return InferenceRequest(request_id="r", target_model=model, incoming_model=model, kind="completions",
                            prompt_text="x", headers={})


def test_lora_affinity_prefers_the_endpoint_that_lists_the_adapter():
    from epp.framework import Endpoint, Metrics

    listed = Endpoint("listed", "10.0.0.1", 8000, metrics=Metrics(max_active_models=2, ok=True))
    listed.served = ServedModels(models=frozenset({"base"}), adapters={"sql-lora": "base"}, ok=True)
    room = Endpoint("room", "10.0.0.2", 8000, metrics=Metrics(max_active_models=2, ok=True))
    running = Endpoint("running", "10.0.0.3", 8000,
                       metrics=Metrics(max_active_models=2, running_lora_adapters=frozenset({"sql-lora"}), ok=True))
    scorer = plugin("lora-affinity-scorer")
    scores = scorer.score(CycleState(), request("sql-lora"), [listed, room, running])
    assert scores == [0.9, 0.8, 1.0]
    assert scorer.score(CycleState(), request("other"), [listed]) == [0.8]
