"""Hot-path cost of token-producer's tokenization, alone and with precise-prefix-cache-producer's lookup.

    .venv/bin/python -m bench.tokenize_cost [--rounds 20] [--tokenizer tests/fixtures/tokenizer]

For chat requests whose system prompt is about 1k, 8k and 32k characters (English-like text
from the README) followed by a short user message, prints the median of the request's wait
(the director's await before the cycle + PrepareData) and of the longest time the event
loop was held meanwhile (what every other request on the loop waits), for:
- inProcess: the in-process backend (chat template + `tokenizers`), uncached (a system
  prompt never seen before: a piece of 2,048 characters or more is encoded by the library's
  own threads in the await) and cached (the same system prompt, a new user message: its
  piece comes from the piece cache);
- vllm: the await before the cycle plus PrepareData with the vllm backend against a render
  endpoint on 127.0.0.1 (an `epp sim --tokenizer` process), uncached (one render round
  trip: the loop is free meanwhile but for the request's JSON encoding and the answer's
  parsing) and cached (the body rendered before: the render key digest and a cache lookup,
  no I/O);
- estimate: the 4-bytes-per-token estimate, for scale.

Then the hot path of the precise prefix cache, tokenization + lookup, as the picker runs
it: the reference's sample pipeline (tests/fixtures/reference/configs/
llm-d-precise-prefix-cache.yaml: token-producer -> precise-prefix-cache-producer, blockSize
64 -> prefix-cache-scorer) built by epp.assembly with only token-producer's backend
replaced, each request through the director's steps (PluginSet.prefetch, then run_cycle
over 8 endpoints). Per request, the median of: token-producer (the await before the cycle
+ its PrepareData), precise-prefix-cache-producer's PrepareData (block keys + index
lookup + the approximate fallback's text hashes), and their sum, for:
- inProcess: cached prefix (the system prompt tokenized before, a new user message, and
  its blocks fed to one endpoint through the producer's in-process `feed`) and uncached
  (a system prompt never seen, and an index holding nothing);
- vllm (render cached): the body rendered before (cache lookup, no I/O), with the
  prompt's blocks in the index (cached) or an empty index (uncached).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import yaml

from epp.assembly import build_plugin, load_plugin_set
from epp.datalayer.kvevents import BlockStored
from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import PREFIX_MATCH_INFO, TOKEN_IDS
from epp.requestcontrol.pluginset import PluginSet

ROOT = Path(__file__).parents[1]
DEFAULT_TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
PRECISE_CONFIG = ROOT / "tests" / "fixtures" / "reference" / "configs" / "llm-d-precise-prefix-cache.yaml"
ENDPOINTS = 8
SIZES = (1_000, 8_000, 32_000)
MODEL = "bench-model"


def _words() -> list[str]:
    return (ROOT / "README.md").read_text().split()


def system_prompt(chars: int, seed: int) -> str:
    words = _words()
    out, n, i = [], 0, seed * 7919
    while n < chars:
        w = words[i % len(words)]
        out.append(w)
        n += len(w) + 1
        i += 13
    return " ".join(out)[:chars]


def request(system: str, user: str, rid: str) -> InferenceRequest:
    body = {"model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return InferenceRequest(rid, MODEL, MODEL, "chat", system + user, {}, body=body)


async def _ticker(stop: asyncio.Event, worst: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0)
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last)
        last = now


async def _median(fn: Callable[[int], Awaitable[Mapping[str, float] | None]], rounds: int) -> dict[str, float]:
    """Medians over `rounds` calls of fn: "wait" (the call), "held" (the longest loop hold
    meanwhile) and each part (seconds) fn returns."""
    samples: dict[str, list[float]] = {}
    for i in range(rounds):
        stop, worst = asyncio.Event(), [0.0]
        ticker = asyncio.create_task(_ticker(stop, worst))
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        parts = await fn(i) or {}
        wait = time.perf_counter() - t0
        stop.set()
        await ticker
        for key, v in {"wait": wait, "held": worst[0], **parts}.items():
            samples.setdefault(key, []).append(v)
    return {key: statistics.median(v) for key, v in samples.items()}


Row = tuple[str, int, str, dict[str, float]]  # backend, characters, prefix, medians


class HotPath:
    """The precise pipeline of the reference's sample config with token-producer's
    `parameters`, built by epp.assembly; run() takes a request through the director's steps
    and returns the seconds of each part."""

    def __init__(self, token_params: dict) -> None:
        config = yaml.safe_load(PRECISE_CONFIG.read_text())
        spec = next(p for p in config["plugins"] if p["type"] == "token-producer")
        spec["parameters"] = token_params
        self.prepare: dict[str, float] = {}
        self.plugins: PluginSet = load_plugin_set(yaml.safe_dump(config), PluginHandle(), observe=self._observe)
        self.producer = self.plugins.plugins["precise-prefix-cache-producer"]
        self.endpoints = [Endpoint(f"ep{i}", f"10.0.0.{i}", 8000) for i in range(ENDPOINTS)]
        for e in self.endpoints:  # streams known good (precise), holding nothing yet
            self.producer.feed(e.name, [])

    def _observe(self, point: str, _type: str, name: str, seconds: float) -> None:
        if point == "PrepareData":
            self.prepare[name] = seconds

    async def run(self, req: InferenceRequest) -> dict[str, float]:
        t0 = time.perf_counter()
        await self.plugins.prefetch(req)
        waited = time.perf_counter() - t0
        self.cycle, _ = self.plugins.run_cycle(req, self.endpoints)
        tokenize = waited + self.prepare["token-producer"]
        lookup = self.prepare["precise-prefix-cache-producer"]
        return {"total": tokenize + lookup, "tokenize": tokenize, "await": waited, "lookup": lookup}

    async def close(self) -> None:
        """Stop what the plugins keep open (token-producer's render client), as the server does."""
        for p in self.plugins.plugins.values():
            stop = getattr(p, "stop_background", None)
            if stop is not None:
                await stop()

    def matched(self) -> int:
        """Blocks of the last request's prompt that the best endpoint holds in the block
        index (0 if nothing matched or the match was the approximate fallback's)."""
        info = self.cycle.read(PREFIX_MATCH_INFO.of(self.producer.name))
        precise = info.by_medium and all("approximate" not in m for m in info.by_medium.values())
        return info.longest if precise else 0

    def hold(self, req: InferenceRequest) -> None:
        """Feed endpoint ep0 the full blocks of the last-run request's prompt (token ids
        token-producer published), as a server's BlockStored would."""
        bs = self.producer.block_size
        tokens = self.cycle.read(TOKEN_IDS)
        n = len(tokens) // bs
        assert n, "the prompt is shorter than one block"
        self.producer.feed("ep0", [BlockStored(tuple(range(1, n + 1)), None, tuple(tokens[:n * bs]), bs)],
                           req.target_model)


async def _hot_rows(label: str, token_params: dict, chars: int, shared: str,
                    fresh: Callable[[int], InferenceRequest], render_cached: bool,
                    rounds: int) -> list[Row]:
    """Cached and uncached prefix rows of the hot path for one backend and prompt size.
    render_cached: every timed body is sent through once untimed first (vllm's cache)."""
    cached, uncached = HotPath(token_params), HotPath(token_params)
    try:
        warm = request(shared, "warm", "w")
        await cached.run(warm)
        cached.hold(warm)
        asks = [request(shared, f"new question {i}", f"h{i}") for i in range(rounds)]
        news = [fresh(i) for i in range(rounds)]
        if render_cached:
            for r in asks:
                await cached.run(r)
            for r in news:
                await uncached.run(r)

        async def hit(i: int) -> dict[str, float]:
            parts = await cached.run(asks[i])
            assert cached.matched() > 0, "cached prefix not matched in the block index"
            return parts

        async def miss(i: int) -> dict[str, float]:
            parts = await uncached.run(news[i])
            assert uncached.matched() == 0, "uncached prefix matched"
            return parts

        return [(label, chars, "cached", await _median(hit, rounds)),
                (label, chars, "uncached", await _median(miss, rounds))]
    finally:
        await cached.close()
        await uncached.close()


async def measure(tokenizer_dir: Path, rounds: int) -> tuple[list[Row], list[Row]]:
    """(tokenization rows, hot-path rows)."""
    from devstack.localstack import start_sims

    sim = start_sims(1, model=MODEL, log_dir=Path(tempfile.mkdtemp(prefix="tokenize-cost-")),
                     flags={"tokenizer": str(tokenizer_dir)})
    local_params = {"inProcess": {"path": str(tokenizer_dir)}}
    vllm_params = {"modelName": MODEL, "vllm": {"url": sim.url(0)}}
    h = PluginHandle()
    local = build_plugin("token-producer", "t", local_params, h, "bench")
    vllm = build_plugin("token-producer", "t", vllm_params, h, "bench")
    estimate = build_plugin("token-producer", "t", None, h, "bench")
    ids = itertools.count()
    out: list[Row] = []
    hot: list[Row] = []

    async def run(p, req):
        prefetch = getattr(p, "prefetch_request_data", None)
        if prefetch is not None:
            await prefetch(req)
        p.prepare_request_data(CycleState(), req, [])

    try:
        for chars in SIZES:
            fresh = lambda i, c=chars: request(system_prompt(c, next(ids)), f"question {i}", f"r{next(ids)}")  # noqa: E731
            shared = system_prompt(chars, 0)
            await run(local, request(shared, "warm", "w"))
            await run(vllm, request(shared, "warm", "w"))
            pre_local = [fresh(i) for i in range(rounds)]
            pre_vllm = [fresh(i) for i in range(rounds)]

            async def local_uncached(i, pre=pre_local):
                await run(local, pre[i])

            async def local_cached(i, s=shared):
                await run(local, request(s, f"new question {i}", f"c{i}"))

            async def vllm_uncached(i, pre=pre_vllm):
                await run(vllm, pre[i])

            async def vllm_cached(i, s=shared):
                await run(vllm, request(s, "warm", f"v{i}"))

            async def est(i, s=shared):
                await run(estimate, request(s, f"q {i}", "e"))

            out += [("inProcess", chars, "uncached", await _median(local_uncached, rounds)),
                    ("inProcess", chars, "cached", await _median(local_cached, rounds)),
                    ("vllm", chars, "uncached", await _median(vllm_uncached, rounds)),
                    ("vllm", chars, "cached", await _median(vllm_cached, rounds)),
                    ("estimate", chars, "-", await _median(est, rounds))]
            hot += await _hot_rows("inProcess", local_params, chars, shared, fresh, False, rounds)
            hot += await _hot_rows("vllm", vllm_params, chars, shared, fresh, True, rounds)
    finally:
        await vllm.render.close()
        sim.stop()
    return out, hot


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:>8.1f}us"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    rows, hot = asyncio.run(measure(args.tokenizer, args.rounds))
    print(f"tokenization, median of {args.rounds}")
    print(f"{'backend':<10} {'chars':>6} {'prefix':<9} {'wait':>10} {'loop held':>10}")
    for backend, chars, prefix, m in rows:
        print(f"{backend:<10} {chars:>6} {prefix:<9} {_us(m['wait'])} {_us(m['held'])}")
    print(f"hot path: token-producer + precise-prefix-cache-producer PrepareData ({ENDPOINTS} endpoints,"
          f" the reference's sample config), median of {args.rounds}; vllm: render cached")
    print(f"{'backend':<10} {'chars':>6} {'prefix':<9} {'total':>10} {'tokenize':>10} {'(await)':>10} {'lookup':>10}")
    for backend, chars, prefix, m in hot:
        print(f"{backend:<10} {chars:>6} {prefix:<9} {_us(m['total'])} {_us(m['tokenize'])} {_us(m['await'])}"
              f" {_us(m['lookup'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
