"""`epp bench soak`: mixed good and hostile requests through the real Envoy and the picker, per
ext_proc transport, then checks that nothing stayed counted in flight and how much the picker's
memory grew.

    epp bench soak [--requests 20000] [--transports grpcio,native] [--concurrency 32]

Each transport gets a fresh stack (devstack.localstack: `epp sim` servers, `epp serve
--ext-proc-transport=<t>`, Envoy full duplex) on 127.0.0.1. The request mix (REQUEST_MIX) is
drawn with a fixed seed; every request is a raw HTTP/1.1 exchange on its own connection so a
request can be cut off in any phase. After the run the picker's in-flight counts (project API
ListEndpoints, per endpoint, and the /metrics running-requests gauge) must drain to 0; RSS
(/proc/<pid>/status VmRSS) is read at start, after a warm-up of good requests, and at the end.
Exit status 1 if anything stays in flight, the picker stops answering, or RSS grew more than
--max-rss-growth-mib after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.loadgen import Progress
from bench.report import RESULTS_DIR, command_line, table, write_markdown
from bench.workloads import DEFAULT_MODEL
from devstack.launch import free_port, wait_until
from devstack.localstack import EPP, HOST, LocalStack, local_stack, metric_sum

TRANSPORTS = ("grpcio", "native")
# kind -> weight in the mix (per mille, roughly)
REQUEST_MIX: dict[str, int] = {
    "completion": 250,
    "chat-stream": 200,
    "bad-json": 80,
    "cancel-before-body": 60,
    "cancel-mid-body": 60,
    "cancel-mid-response": 60,
    "repeated-headers": 80,
    "unknown-model": 80,
    "oversized-body": 20,
    "absurd-max-tokens": 110,
}
CANCELLED = {"cancel-before-body", "cancel-mid-body", "cancel-mid-response"}
BODY_LIMIT = 256 * 1024  # --max-request-body-bytes given to the picker when it has the flag
REQUEST_TIMEOUT = 30.0  # seconds per request, connect to last byte
DRAIN_TIMEOUT = 20.0  # seconds for in-flight counts to reach 0 after the last request
MAX_RESPONSE = 1 << 20  # bytes read of one response at most
ABSURD_MAX_TOKENS: tuple[object, ...] = (-1_000_000_000_000_000_000, 10**30, -1, 1.5, "9", None, True, 0)
BAD_BODIES: tuple[bytes, ...] = (b'{"model": "m", "prompt": ', b"not json", b"[1, 2, 3]", b'{"model": 5}',
                                 b"\xff\xfe\x00garbage", b"", b'{"model": "' + b"x" * 5000 + b'"')


@dataclass(slots=True)
class Outcomes:
    transport: str
    counts: dict[str, Counter] = field(default_factory=dict)  # kind -> outcome -> n
    sent: int = 0
    rss_start_kib: int = 0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    in_flight_requests: int = -1  # summed over endpoints (project API); -1 = could not read
    in_flight_tokens: int = -1
    running_gauge: float = -1.0  # inference_objective_running_requests summed
    answering: bool = False
    tracebacks: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def add(self, kind: str, outcome: str) -> None:
        self.counts.setdefault(kind, Counter())[outcome] += 1

    @property
    def rss_growth_mib(self) -> float:
        return (self.rss_end_kib - self.rss_warm_kib) / 1024

    def failures(self, max_rss_growth_mib: float) -> list[str]:
        out = []
        if self.in_flight_requests != 0 or self.in_flight_tokens != 0:
            out.append(f"in flight after the run: {self.in_flight_requests} requests, "
                       f"{self.in_flight_tokens} tokens (must be 0)")
        if self.running_gauge != 0:
            out.append(f"inference_objective_running_requests after the run: {self.running_gauge:g} (must be 0)")
        if not self.answering:
            out.append("the picker stopped answering")
        if self.rss_growth_mib > max_rss_growth_mib:
            out.append(f"RSS grew {self.rss_growth_mib:.1f} MiB after the warm-up (limit {max_rss_growth_mib:g})")
        return out


# --------------------------------------------------------------------------- requests
@dataclass(slots=True)
class Exchange:
    """One raw HTTP/1.1 request and where the client cuts it off."""

    kind: str
    head: bytes
    body: bytes
    send_body: int  # bytes of the body actually sent
    read_response: bool  # False: close right after sending
    stop_after_first_chunk: bool = False


def _head(path: str, body_len: int, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {HOST}", "content-type: application/json",
             f"content-length: {body_len}", "connection: close", *(f"{k}: {v}" for k, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()  # not orjson: absurd max_tokens exceed 64 bits


def make_exchange(kind: str, i: int, rng: random.Random, model: str, body_limit: int | None) -> Exchange:
    prompt = f"soak request {i}: " + " ".join(rng.choice(("alpha", "beta", "gamma", "delta")) for _ in range(40))
    completion = {"model": model, "prompt": prompt, "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "stream": True}
    path, extra = "/v1/completions", ()
    if kind == "completion":
        body = _json(completion)
    elif kind == "chat-stream":
        path, body = "/v1/chat/completions", _json(chat)
    elif kind == "bad-json":
        body = BAD_BODIES[i % len(BAD_BODIES)]
    elif kind == "unknown-model":
        body = _json({**completion, "model": f"soak-unknown-{i}"})  # every one a new name
    elif kind == "absurd-max-tokens":
        body = _json({**completion, "max_tokens": ABSURD_MAX_TOKENS[i % len(ABSURD_MAX_TOKENS)]})
    elif kind == "oversized-body":
        body = _json({**completion, "prompt": "y" * ((body_limit or BODY_LIMIT) + 4096)})
    elif kind == "repeated-headers":
        # Two ids on one request, ids shared by concurrent requests, a header repeated many times.
        extra = (("x-request-id", f"soak-dup-{i % 5}"), ("x-request-id", f"soak-dup-{i % 3}"),
                 *(("x-soak-repeat", str(n)) for n in range(20)))
        body = _json(completion)
    elif kind in CANCELLED:
        path = "/v1/chat/completions"
        body = _json({**chat, "max_tokens": 400})
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    send = {"cancel-before-body": 0, "cancel-mid-body": len(body) // 2}.get(kind, len(body))
    return Exchange(kind, _head(path, len(body), extra), body, send,
                    read_response=kind not in ("cancel-before-body", "cancel-mid-body"),
                    stop_after_first_chunk=kind == "cancel-mid-response")


async def run_exchange(port: int, ex: Exchange) -> str:
    """The outcome: `HTTP <status>` (`HTTP 200 cut` for a stream cut off on purpose,
    `HTTP 200 incomplete` if a good stream ended early), `client-cancelled`, `reset`, `timeout`."""
    writer = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(ex.head + ex.body[:ex.send_body])
            await writer.drain()
            if not ex.read_response:
                return "client-cancelled"
            return await _read_response(reader, ex)
    except TimeoutError:
        return "timeout"
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        return "reset"
    finally:
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader, ex: Exchange) -> str:
    status_line = await reader.readline()
    m = re.match(rb"HTTP/1\.[01] (\d{3})", status_line)
    if not m:
        return "reset"
    status = int(m.group(1))
    if ex.stop_after_first_chunk and status == 200:
        await reader.readuntil(b"data:")
        return "HTTP 200 cut"
    data = await reader.read(MAX_RESPONSE)
    while len(data) < MAX_RESPONSE and (chunk := await reader.read(MAX_RESPONSE - len(data))):
        data += chunk
    if ex.kind == "chat-stream" and status == 200 and b"data: [DONE]" not in data:
        return "HTTP 200 incomplete"
    return f"HTTP {status}"


def plan(n: int, seed: int, kinds: Sequence[str]) -> list[str]:
    rng = random.Random(seed)
    weights = [REQUEST_MIX[k] for k in kinds]
    return rng.choices(list(kinds), weights, k=n)


async def send_all(port: int, kinds: list[str], *, model: str, concurrency: int, seed: int,
                   body_limit: int | None, deadline: float, out: Outcomes, progress: Progress | None) -> None:
    rng = random.Random(seed + 1)
    exchanges = (make_exchange(k, i, rng, model, body_limit) for i, k in enumerate(kinds))  # lazily: bodies are large
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for ex in exchanges:
            if time.monotonic() > deadline:
                out.add(ex.kind, "not sent (time limit)")
                continue
            outcome = await run_exchange(port, ex)
            out.add(ex.kind, outcome)
            out.sent += 1
            if ex.kind in ("completion", "chat-stream") and outcome != "HTTP 200":
                errors += 1
            if progress:
                progress.update(out.sent, errors)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if progress:
        progress.close()


# --------------------------------------------------------------------------- picker state
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def list_in_flight(addrs: Sequence[str]) -> tuple[int, int]:
    """(requests, tokens) in flight summed over the picker's endpoints, from the first
    project-API address that answers."""
    from proto import epp_api_pb2 as pb
    from proto import epp_api_pb2_grpc as pb_grpc

    last: Exception | None = None
    for addr in addrs:
        try:
            with grpc.insecure_channel(addr) as ch:
                resp = pb_grpc.EndpointPickerStub(ch).ListEndpoints(pb.ListEndpointsRequest(), timeout=5)
            return (sum(e.in_flight_requests for e in resp.endpoints),
                    sum(e.in_flight_tokens for e in resp.endpoints))
        except grpc.RpcError as e:
            last = e
    raise ConnectionError(f"project API not answering on {', '.join(addrs)}: {last}")


def serve_flags() -> str:
    return subprocess.run([*EPP, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout


async def _good_requests(port: int, n: int, model: str) -> int:
    rng = random.Random(0)
    results = await asyncio.gather(*(run_exchange(port, make_exchange("completion", i, rng, model, None))
                                     for i in range(n)))
    return sum(r == "HTTP 200" for r in results)


def soak_one(transport: str, n: int, *, servers: int, concurrency: int, seed: int, time_limit: float,
             warmup: int, time_scale: float, show_progress: bool,
             kinds: Sequence[str] = tuple(REQUEST_MIX), serve_extra: Sequence[str] = ()) -> Outcomes:
    out = Outcomes(transport)
    help_text = serve_flags()
    kinds = list(kinds)
    api_port = free_port()
    picker_flags = [f"--ext-proc-transport={transport}", f"--api-port={api_port}", *serve_extra]
    body_limit = None
    if "--max-request-body-bytes" in help_text:
        body_limit = BODY_LIMIT
        picker_flags.append(f"--max-request-body-bytes={BODY_LIMIT}")
    else:
        if "oversized-body" in kinds:
            kinds.remove("oversized-body")
        out.notes.append("oversized-body skipped: this `epp serve` has no --max-request-body-bytes")
    model = DEFAULT_MODEL
    with local_stack(servers, model=model, time_scale=time_scale, picker_flags=picker_flags) as st:
        pid = st.picker.process.pid
        port = st.envoy.port
        addrs = [f"{HOST}:{api_port}", f"{HOST}:{st.picker.grpc_port}"]
        out.rss_start_kib = rss_kib(pid)
        ok = asyncio.run(_good_requests(port, warmup, model)) if warmup else 0
        if warmup and ok < warmup:
            out.notes.append(f"warm-up: only {ok}/{warmup} good requests answered 200")
        out.rss_warm_kib = rss_kib(pid)
        progress = Progress(f"soak {transport:<7}", n) if show_progress else None
        t0 = time.monotonic()
        asyncio.run(send_all(port, plan(n, seed, kinds), model=model, concurrency=concurrency, seed=seed,
                             body_limit=body_limit, deadline=t0 + time_limit, out=out, progress=progress))
        out.seconds = time.monotonic() - t0
        _read_after(out, st, addrs, port, model)
        out.rss_end_kib = rss_kib(pid)
        log = st.picker.log(1_000_000)
        out.tracebacks = log.count("Traceback")
        if out.tracebacks:
            first = log[log.index("Traceback"):].splitlines()[:40]
            out.notes.append("first traceback in the picker's log:\n    " + "\n    ".join(first))
    return out


def _read_after(out: Outcomes, st: LocalStack, addrs: list[str], port: int, model: str) -> None:
    """Wait (bounded) for the picker's in-flight counts to drain, then record them."""

    def drained() -> bool:
        out.in_flight_requests, out.in_flight_tokens = list_in_flight(addrs)
        out.running_gauge = metric_sum(st.picker.metrics(), "inference_objective_running_requests")
        return out.in_flight_requests == 0 and out.in_flight_tokens == 0 and out.running_gauge == 0

    try:
        wait_until(drained, DRAIN_TIMEOUT, "in-flight counts to drain", interval=0.2)
    except TimeoutError:
        pass  # the counts stay recorded; failures() reports them
    except ConnectionError as e:
        out.notes.append(str(e))
    out.answering = asyncio.run(_good_requests(port, 3, model)) == 3


# --------------------------------------------------------------------------- report
def outcome_rows(out: Outcomes) -> list[list[str]]:
    rows = []
    for kind in REQUEST_MIX:
        c = out.counts.get(kind)
        if c:
            rows.append([kind, str(sum(c.values())), ", ".join(f"{o} x{k}" for o, k in sorted(c.items()))])
    return rows


def state_rows(results: Sequence[Outcomes]) -> list[list[str]]:
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    return [[o.transport, str(o.sent), f"{o.seconds:.0f}", f"{o.sent / o.seconds:.0f}" if o.seconds else "-",
             str(o.in_flight_requests), str(o.in_flight_tokens), f"{o.running_gauge:g}",
             mib(o.rss_start_kib), mib(o.rss_warm_kib), mib(o.rss_end_kib), f"{o.rss_growth_mib:+.1f}",
             "yes" if o.answering else "NO", str(o.tracebacks)] for o in results]


STATE_HEADERS = ["transport", "requests", "s", "req/s", "in flight", "in-flight tokens", "running gauge",
                 "RSS start MiB", "RSS warm MiB", "RSS end MiB", "growth MiB", "answering", "tracebacks"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="epp bench soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000, help="requests per transport (default 20000)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated: grpcio,native")
    ap.add_argument("--servers", type=int, default=2, help="`epp sim` servers")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in progress at once")
    ap.add_argument("--warmup", type=int, default=100, help="good requests before the RSS baseline")
    ap.add_argument("--time-scale", type=float, default=20.0, help="simulator seconds per wall second")
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds per transport; then stop sending")
    ap.add_argument("--max-rss-growth-mib", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--name", default="soak")
    ap.add_argument("--kinds", default=",".join(REQUEST_MIX),
                    help="comma-separated request kinds of the mix (default all), e.g. to see what grows RSS")
    ap.add_argument("--serve-flags", type=shlex.split, default=[],
                    help="extra `epp serve` flags, e.g. '--metrics-max-model-labels=20'")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    a = ap.parse_args(argv)
    transports = [t.strip() for t in a.transports.split(",") if t.strip()]
    if not transports or set(transports) - set(TRANSPORTS):
        ap.error(f"--transports: choose from {', '.join(TRANSPORTS)}")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(REQUEST_MIX):
        ap.error(f"--kinds: choose from {', '.join(REQUEST_MIX)}")
    if a.requests < 1 or a.concurrency < 1 or a.servers < 1 or a.requests > 1_000_000:
        ap.error("--requests (1..1000000), --concurrency and --servers must be positive")
    results: list[Outcomes] = []
    try:
        for t in transports:
            print(f"soak: {a.requests} mixed requests through Envoy -> epp serve --ext-proc-transport={t}",
                  flush=True)
            results.append(soak_one(t, a.requests, servers=a.servers, concurrency=a.concurrency, seed=a.seed,
                                    time_limit=a.time_limit, warmup=a.warmup, time_scale=a.time_scale,
                                    show_progress=a.progress, kinds=kinds, serve_extra=a.serve_flags))
    except KeyboardInterrupt:
        print("\nepp bench soak: interrupted; every process stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"epp bench soak: {e}", file=sys.stderr)
        return 1
    sections = []
    for o in results:
        text = table(["kind", "n", "outcomes"], outcome_rows(o))
        print(f"\n{o.transport}:\n{text}")
        for note in o.notes:
            print(f"note: {note}")
        sections.append(f"### {o.transport}\n\n{table(['kind', 'n', 'outcomes'], outcome_rows(o), markdown=True)}"
                        + "".join(f"\n\nNote: {n}" for n in o.notes))
    print("\n" + table(STATE_HEADERS, state_rows(results)))
    failures = [f"{o.transport}: {f}" for o in results for f in o.failures(a.max_rss_growth_mib)]
    verdict = "\n".join(f"FAIL {f}" for f in failures) or "OK: nothing left in flight; RSS growth within limit"
    print("\n" + verdict)
    body = (f"{a.requests} requests per transport, concurrency {a.concurrency}, {a.servers} `epp sim` servers at "
            f"--time-scale {a.time_scale:g}, Envoy full duplex; RSS growth is measured from after "
            f"{a.warmup} warm-up requests.\n\n" + table(STATE_HEADERS, state_rows(results), markdown=True)
            + "\n\n" + "\n\n".join(sections) + f"\n\n{verdict}")
    md = a.out / f"{a.name}.md"
    write_markdown(md, "Soak: mixed and hostile requests through the real stack", command_line(["bench", "soak", *argv]),
                   body)
    print(f"results: {md}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
