"""An asyncio load generator speaking the OpenAI chat API with streaming.

Per request it measures time to first token (first SSE chunk carrying content),
inter-token latencies (gaps between content chunks), end-to-end latency, token counts
from the final usage chunk (including prompt_tokens_details.cached_tokens) and errors.
Arrivals are open-loop Poisson at a rate or closed-loop at a fixed concurrency. Turns of a
multi-turn session are sent in order, each after the previous one finished.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.workloads import LoadSpec, WorkItem, arrival_times


@dataclass(slots=True)
class RequestResult:
    index: int
    start: float  # seconds since the run started
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    status: int = 0
    error: str = ""
    group: int = 0

    @property
    def ok(self) -> bool:
        return not self.error and self.status == 200


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(slots=True)
class Summary:
    requests: int
    errors: int
    duration: float  # first send to last completion, seconds
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    itl_p50: float
    itl_p90: float
    e2e_p50: float
    e2e_p90: float
    output_tokens_per_s: float
    requests_per_s: float
    cached_fraction: float  # cached prompt tokens / prompt tokens, from usage

    @staticmethod
    def of(results: Sequence[RequestResult], duration: float) -> Summary:
        ok = [r for r in results if r.ok]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        itl = [x for r in ok for x in r.itl]
        e2e = [r.e2e for r in ok]
        out = sum(r.output_tokens for r in ok)
        prompt = sum(r.prompt_tokens for r in ok)
        cached = sum(r.cached_tokens for r in ok)
        d = duration if duration > 0 else math.nan
        return Summary(
            requests=len(results), errors=len(results) - len(ok), duration=duration,
            ttft_p50=percentile(ttft, 50), ttft_p90=percentile(ttft, 90), ttft_p99=percentile(ttft, 99),
            itl_p50=percentile(itl, 50), itl_p90=percentile(itl, 90),
            e2e_p50=percentile(e2e, 50), e2e_p90=percentile(e2e, 90),
            output_tokens_per_s=out / d, requests_per_s=len(ok) / d,
            cached_fraction=cached / prompt if prompt else math.nan,
        )


@dataclass(slots=True)
class RunResult:
    results: list[RequestResult]
    duration: float

    def summary(self) -> Summary:
        return Summary.of(self.results, self.duration)


class Progress:
    """A live progress line on stderr (redrawn in place on a terminal, a line every few
    seconds otherwise)."""

    def __init__(self, label: str, total: int, stream=None, width: int = 28) -> None:
        self.label = label
        self.total = max(1, total)
        self.done = 0
        self.errors = 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.started = time.monotonic()
        self._last = 0.0
        self.extra: Callable[[], str] | None = None

    def update(self, done: int | None = None, errors: int | None = None, force: bool = False) -> None:
        if done is not None:
            self.done = done
        if errors is not None:
            self.errors = errors
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        extra = f" {self.extra()}" if self.extra else ""
        line = (f"{self.label} [{bar}] {self.done}/{self.total} {now - self.started:5.1f}s"
                f"{f' errors={self.errors}' if self.errors else ''}{extra}")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.update(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


async def send_one(session: aiohttp.ClientSession, url: str, item: WorkItem, t0: float,
                   headers: dict[str, str] | None = None) -> RequestResult:
    """One streamed chat completion; never raises (errors are recorded)."""
    start = time.perf_counter()
    res = RequestResult(index=item.index, start=start - t0, group=item.group)
    last = start
    try:
        async with session.post(url, data=orjson.dumps(item.body(stream=True)),
                                headers={"content-type": "application/json", **item.headers, **(headers or {})}) as resp:
            res.status = resp.status
            if resp.status != 200:
                text = (await resp.read())[:200].decode(errors="replace")
                res.error = f"HTTP {resp.status}: {text.strip()}"
                return res
            chunks = 0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                ev = orjson.loads(data)
                if "error" in ev:
                    res.error = f"stream error: {str(ev['error'])[:200]}"
                    break
                choices = ev.get("choices") or ()
                if choices and (choices[0].get("delta") or {}).get("content"):
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = ev.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    res.cached_tokens = int(details.get("cached_tokens") or 0)
            if not res.output_tokens:
                res.output_tokens = chunks
            if res.ttft is None and not res.error:
                res.error = "no tokens in the stream"
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        res.e2e = time.perf_counter() - start
    return res


class _Sessions:
    """Turn k of a session waits until turn k-1 finished (plus think time)."""

    def __init__(self, items: Sequence[WorkItem]) -> None:
        self._done: dict[tuple[int, int], asyncio.Event] = {
            (it.session, it.turn): asyncio.Event() for it in items if it.session >= 0}

    async def wait_turn(self, item: WorkItem) -> None:
        if item.session >= 0 and item.turn > 0:
            prev = self._done.get((item.session, item.turn - 1))
            if prev is not None:
                await prev.wait()
                if item.think_time > 0:
                    await asyncio.sleep(item.think_time)

    def finished(self, item: WorkItem) -> None:
        if item.session >= 0:
            self._done[(item.session, item.turn)].set()


async def run_load(base_url: str, items: Sequence[WorkItem], load: LoadSpec, *, seed: int = 1,
                   progress: Progress | None = None, headers: dict[str, str] | None = None,
                   timeout: float = 600.0, path: str = "/v1/chat/completions") -> RunResult:
    """Send `items` to base_url at the load's arrival pattern; returns every request's result."""
    url = base_url.rstrip("/") + path
    results: list[RequestResult] = []
    sessions = _Sessions(items)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    errors = 0

    def record(item: WorkItem, r: RequestResult) -> None:
        nonlocal errors
        results.append(r)
        errors += 0 if r.ok else 1
        sessions.finished(item)
        if progress:
            progress.update(len(results), errors)

    async def tick() -> None:  # keeps the progress line moving while nothing completes
        while True:
            await asyncio.sleep(0.25)
            progress.update()

    ticker = asyncio.create_task(tick()) if progress else None
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t0 = time.perf_counter()

        async def one(item: WorkItem, at: float | None) -> None:
            if at is not None:
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
            await sessions.wait_turn(item)
            record(item, await send_one(session, url, item, t0, headers))

        if load.type == "concurrency":
            queue = list(reversed(items))

            async def worker() -> None:
                while queue:
                    await one(queue.pop(), None)

            await asyncio.gather(*(worker() for _ in range(max(1, load.concurrency))))
        else:
            offsets = arrival_times(len(items), load.rate, seed)
            await asyncio.gather(*(one(it, at) for it, at in zip(items, offsets, strict=True)))
        duration = time.perf_counter() - t0
    if ticker:
        ticker.cancel()
    if progress:
        progress.close()
    results.sort(key=lambda r: r.index)
    return RunResult(results, duration)
