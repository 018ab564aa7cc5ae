"""MetricsCollector against real aiohttp model-server stand-ins on 127.0.0.1."""

import asyncio
import time

import pytest
from aiohttp import web

from bench.scrape_cost import realistic_vllm_page
from devstack.launch import free_port
from epp.datalayer import MetricsCollector, is_stale
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.framework import ENGINE_TYPE_LABEL, Metrics
from tests.servers import eventually


class FakeServer:
    """A /metrics server whose page and behaviour (ok, slow, fail) tests can change."""

    def __init__(self, page: bytes) -> None:
        self.page = page
        self.mode = "ok"
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "fail":
            return web.Response(status=500, text="boom")
        if self.mode == "chunked":  # no Content-Length: chunked transfer encoding
            resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await resp.prepare(request)
            for i in range(0, len(self.page), 4096):
                await resp.write(self.page[i:i + 4096])
            await resp.write_eof()
            return resp
        return web.Response(body=self.page, content_type="text/plain")

    async def start(self) -> "FakeServer":
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


SGLANG_PAGE = (b"# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"m\"} 11\n"
               b"sglang:num_running_reqs{model_name=\"m\"} 4\nsglang:token_usage{model_name=\"m\"} 0.5\n"
               b"sglang:cache_config_info{page_size=\"64\",num_pages=\"100\"} 1\n")


@pytest.fixture
async def servers():
    started = [await FakeServer(realistic_vllm_page(waiting=1, seed=i)).start() for i in range(3)]
    started.append(await FakeServer(SGLANG_PAGE).start())
    try:
        yield started
    finally:
        for s in started:
            await s.stop()


def spec(name: str, server: FakeServer, **labels: str) -> EndpointSpec:
    return EndpointSpec(name=name, address="127.0.0.1", port=server.port, labels=labels)


async def test_scrapes_fresh_and_marks_a_slow_or_failing_endpoint_stale(servers):
    a, b, c, sg = servers
    ds = Datastore()
    ds.replace_all([spec("a", a), spec("b", b), spec("c", c), spec("sg", sg, **{ENGINE_TYPE_LABEL: "sglang"})])
    collector = MetricsCollector(ds, interval=0.02, timeout=0.3)
    await collector.start()
    try:
        ep = {e.name: e for e in ds.endpoints()}
        await eventually(lambda: all(e.metrics.ok for e in ep.values()), "first scrape of every endpoint")
        assert ep["a"].metrics.num_gpu_blocks == 27400 and ep["a"].metrics.waiting_queue_size == 1
        assert (ep["sg"].metrics.waiting_queue_size, ep["sg"].metrics.block_size) == (11, 64)

        a.page = realistic_vllm_page(waiting=9)
        await eventually(lambda: ep["a"].metrics.waiting_queue_size == 9, "a's new queue size")

        c.mode = "slow"
        await eventually(lambda: not ep["c"].metrics.ok, "c stale after a timeout", timeout=15)
        stale = ep["c"].metrics
        assert stale.num_gpu_blocks == 27400  # last snapshot kept, only marked not ok
        fresh_since = time.monotonic()
        await eventually(lambda: ep["a"].metrics.update_time > fresh_since and ep["b"].metrics.update_time > fresh_since,
                    "the others keep updating while c hangs")
        assert ep["c"].metrics.update_time == stale.update_time  # its age grows
        assert is_stale(ep["c"].metrics, stale.update_time + 2.5, 2.0)
        assert not is_stale(ep["a"].metrics, ep["a"].metrics.update_time + 0.1, 2.0)
        assert collector.stats(ep["c"]).failed >= 1 and "Timeout" in collector.stats(ep["c"]).last_error

        c.mode = "ok"
        await eventually(lambda: ep["c"].metrics.ok, "c recovered", timeout=15)
        c.mode = "fail"
        await eventually(lambda: not ep["c"].metrics.ok, "c stale after HTTP 500")
        assert "500" in collector.stats(ep["c"]).last_error
    finally:
        await collector.stop()


async def test_follows_endpoint_set_changes_and_stops(servers):
    a, b, c, _ = servers
    ds = Datastore()
    ds.replace_all([spec("a", a), spec("b", b)])
    collector = MetricsCollector(ds, interval=0.02, timeout=0.5)
    await collector.start()
    try:
        await eventually(lambda: all(e.metrics.ok for e in ds.endpoints()), "a and b scraped")
        removed = ds.get("b")
        ds.remove("b")
        assert removed not in collector.scraping()
        await asyncio.sleep(0)  # let the cancellation land
        hits = b.hits
        ds.upsert(spec("c", c))
        await eventually(lambda: ds.get("c").metrics.ok, "c scraped after it was added")
        assert b.hits <= hits + 1  # at most the request that was in flight when b left
        assert {e.name for e in collector.scraping()} == {"a", "c"}
    finally:
        await collector.stop()
    assert collector.scraping() == frozenset()
    hits = a.hits
    await asyncio.sleep(0.1)
    assert a.hits <= hits + 1  # at most the scrape already sent when the collector stopped (as b above)


async def test_port_override_path_and_unknown_engine(servers):
    a = servers[0]
    ds = Datastore()
    ep = ds.upsert(EndpointSpec(name="x", address="127.0.0.1", port=1, labels={ENGINE_TYPE_LABEL: "tgi"}))
    collector = MetricsCollector(ds, interval=0.02, port_override=a.port, path="metrics")
    await collector.start()
    try:
        await eventually(lambda: ep.metrics.ok, "scrape on the override port")
        assert ep.metrics.num_gpu_blocks == 27400  # unknown engine scraped as vLLM
    finally:
        await collector.stop()


async def test_unreachable_endpoint_never_ok_and_never_raises():
    ds = Datastore()
    ep = ds.upsert(EndpointSpec(name="gone", address="127.0.0.1", port=free_port()))
    collector = MetricsCollector(ds, interval=0.02, timeout=0.2)
    await collector.start()
    try:
        await eventually(lambda: collector.stats(ep).failed >= 3, "repeated failed scrapes")
        assert ep.metrics == Metrics() and is_stale(ep.metrics, time.monotonic(), 2.0)
    finally:
        await collector.stop()


async def test_chunked_pages_and_the_page_size_bound(servers, monkeypatch):
    a = servers[0]
    a.mode = "chunked"
    a.page = realistic_vllm_page(waiting=4)
    ds = Datastore()
    ep = ds.upsert(spec("a", a))
    collector = MetricsCollector(ds, interval=0.02)
    await collector.start()
    try:
        await eventually(lambda: ep.metrics.ok and ep.metrics.waiting_queue_size == 4, "a chunked page parsed")
        monkeypatch.setattr("epp.datalayer.collector.MAX_PAGE_BYTES", 10_000)
        await eventually(lambda: not ep.metrics.ok, "an oversized chunked page rejected")
        assert "exceeds" in collector.stats(ep).last_error
        a.mode = "ok"
        collector.stats(ep).last_error = ""
        await eventually(lambda: "bytes exceeds 10000" in collector.stats(ep).last_error, "an oversized page rejected by length")
    finally:
        await collector.stop()
