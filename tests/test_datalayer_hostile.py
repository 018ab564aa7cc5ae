"""The scraper against a hostile model server (tests.servers.HostileModelServer): every
misbehaviour ends in sane Metrics or a clear per-endpoint scrape failure, with bounded
memory, no traceback in the log, and the other endpoints scraped on schedule."""

import asyncio
import logging
import time
import tracemalloc

import pytest

from epp.datalayer import MetricsCollector
from epp.datalayer import extract as extract_module
from epp.datalayer.datastore import Datastore, EndpointSpec
from epp.datalayer.extract import LABEL_CACHE_BYTES
from epp.datalayer.httpget import BodyTooLarge, ConnectionClosed, HttpGetClient, ProtocolError
from tests.servers import GOOD_PAGE, HOSTILE_VALUES_PAGE, HostileModelServer, eventually

FAILURES = {  # mode -> (exception the client raises, what the scrape's last_error starts with)
    "bad-status": (ProtocolError, "ProtocolError: bad status line"),
    "garbage-status": (ProtocolError, "ProtocolError: bad status line"),
    "huge-length": (BodyTooLarge, "BodyTooLarge: body of a 5000-digit length"),
    "close-mid-body": (ConnectionClosed, "ConnectionClosed: connection closed before the response was complete"),
    "slow-body": (TimeoutError, "TimeoutError: GET"),
    "slow-head": (TimeoutError, "TimeoutError: GET"),
}


def no_tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Records carrying a traceback, or asyncio's reports of an exception in a callback."""
    return [r.getMessage() for r in records
            if r.exc_info or r.name == "asyncio" or "Traceback" in r.getMessage()]


@pytest.mark.parametrize("mode", sorted(FAILURES))
async def test_each_misbehaviour_is_a_clear_error_on_the_client(mode, caplog):
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    async with HostileModelServer(mode=mode, interval=0.05) as server:
        client = HttpGetClient("127.0.0.1", server.port, timeout=0.3)
        try:
            for _ in range(2):  # and again on a fresh connection
                t0 = time.monotonic()
                with pytest.raises(FAILURES[mode][0]):
                    await client.get("/metrics")
                assert time.monotonic() - t0 < 2.0
            server.mode = "page"
            assert (await client.get("/metrics")).body == GOOD_PAGE  # the client is still usable
        finally:
            await client.close()
    assert errors == [] and no_tracebacks(caplog.records) == []


async def test_collector_survives_a_hostile_pool_and_keeps_the_good_endpoint_on_schedule(caplog):
    caplog.set_level(logging.INFO)
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    good = await HostileModelServer(GOOD_PAGE).start()
    values = await HostileModelServer(HOSTILE_VALUES_PAGE).start()
    hostile = {mode: await HostileModelServer(mode=mode, interval=0.05).start() for mode in FAILURES}
    servers = [good, values, *hostile.values()]
    ds = Datastore()
    ds.replace_all([EndpointSpec(name=n, address="127.0.0.1", port=s.port)
                    for n, s in [("good", good), ("values", values), *hostile.items()]])
    interval = 0.05
    collector = MetricsCollector(ds, interval=interval, timeout=0.3)
    await collector.start()
    try:
        ep = {e.name: e for e in ds.endpoints()}
        await eventually(lambda: all(collector.stats(ep[m]).failed >= 2 for m in FAILURES),
                         "two failed scrapes of every hostile endpoint", timeout=20)
        await eventually(lambda: collector.stats(ep["values"]).ok >= 5, "five scrapes of hostile values")
        # on schedule: a 1 s window holds about 1/interval scrapes of the good endpoint
        before, t0 = collector.stats(ep["good"]).ok, time.monotonic()
        await asyncio.sleep(1.0)
        done = collector.stats(ep["good"]).ok - before
        # (a collector that waited out the hostile endpoints one by one would get about 0.15 of them)
        assert done >= 0.3 * (time.monotonic() - t0) / interval, done
    finally:
        await collector.stop()
        for s in servers:
            await s.stop()

    g = ep["good"].metrics
    assert g.ok and (g.waiting_queue_size, g.num_gpu_blocks, g.block_size) == (2, 1000, 16)
    v = ep["values"].metrics  # sane: every hostile value treated as missing
    assert v.ok and (v.waiting_queue_size, v.running_requests_size, v.kv_cache_usage_percent) == (0, 0, 0.0)
    assert (v.num_gpu_blocks, v.block_size) == (None, 16)
    for mode, (_, error) in FAILURES.items():
        stats = collector.stats(ep[mode])
        assert not ep[mode].metrics.ok and stats.ok == 0
        assert stats.last_error.startswith(error), (mode, stats.last_error)
    warned = [r.getMessage() for r in caplog.records if "cache_config_info{num_gpu_blocks}" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("endpoint values: ")  # once per endpoint, not per scrape
    failures_logged = [r for r in caplog.records if "scrape of slow-head" in r.getMessage()]
    assert len(failures_logged) == 1  # a failing endpoint is logged when it starts failing, not every scrape
    assert errors == [] and no_tracebacks(caplog.records) == []


async def test_a_huge_label_changing_every_scrape_keeps_memory_bounded(caplog):
    """A 2 MB label value that changes every scrape (the label cache once grew to 2.5 GB)."""
    server = HostileModelServer()
    server.page_fn = lambda n: (b'vllm:lora_requests_info{running_lora_adapters="%s",waiting_lora_adapters="",'
                                b'max_lora="%d"} %d\n' % (b"%07d," % n * (2 << 17), n % 8 + 1, n + 1) + GOOD_PAGE)
    await server.start()
    ds = Datastore()
    ds.replace_all([EndpointSpec(name="huge", address="127.0.0.1", port=server.port)])
    collector = MetricsCollector(ds, interval=0.02, timeout=2.0)
    tracemalloc.start()
    try:
        await collector.start()
        ep = ds.endpoints()[0]
        await eventually(lambda: collector.stats(ep).ok >= 2, "first scrapes")
        base, _ = tracemalloc.get_traced_memory()
        start = collector.stats(ep).ok
        await eventually(lambda: collector.stats(ep).ok >= start + 15, "15 more scrapes of 2 MB pages", timeout=30)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
        await collector.stop()
        await server.stop()
    page_bytes = len(server.page_fn(0))
    assert page_bytes > 2 << 20
    assert grown < 3 * page_bytes, grown  # at most a page or two in flight, never one kept per scrape
    assert extract_module._label_cache.bytes <= LABEL_CACHE_BYTES
    m = ep.metrics
    assert m.ok and m.running_lora_adapters == frozenset() and 1 <= m.max_active_models <= 8  # value over the cap: dropped
    assert m.num_gpu_blocks == 1000
    assert no_tracebacks(caplog.records) == []
