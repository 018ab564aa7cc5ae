"""Picker cost per routed request, through the real Envoy.

Starts N `epp sim` servers, the picker (`epp serve`, default config, plaintext) and Envoy in
each mode (full-duplex, buffered) plus "direct" (Envoy straight to one server, no picker),
sends the same requests through each, and reports:
  - picker CPU per request: the picker process's utime+stime from /proc/<pid>/stat
    before/after the run, raw and minus its idle rate (scraping) over the same wall time;
  - req/s, and client latency p50/p99 with the latency added over "direct".

    python -m bench.picker_cost --requests 2000 --concurrency 8 --endpoints 8 [--tls] \
        [--transports grpcio,native]

--transports runs the picker once per ext_proc transport (`epp serve --ext-proc-transport`),
one after the other in the same run, and labels the rows mode/transport.

--tracing off (default: `epp serve --tracing=false`) or on: requests sampled (every one
unless OTEL_TRACES_SAMPLER[_ARG] say otherwise) and exported over OTLP/gRPC to a sink in
this process.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import numeric_flags
from devstack.envoy import start_envoy
from devstack.launch import cpu_seconds
from devstack.localstack import start_picker, start_sims


@dataclass
class Result:
    mode: str
    requests: int
    seconds: float
    latencies: list[float]
    picker_cpu: float = 0.0
    picker_idle_cpu: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_load(port: int, requests: int, concurrency: int, body: bytes) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        local: list[float] = []
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            local.append(time.perf_counter() - t0)
            if r.status != 200:
                errors.append(str(r.status))
        conn.close()
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. HTTP {errors[0]}")
    return time.perf_counter() - t0, latencies


def start_trace_sink():
    """An OTLP trace collector on 127.0.0.1 that drops what it receives; the picker (a child
    process) is pointed at it through the OTEL_* environment it inherits."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 - the gRPC method's name
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    os.environ.update({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    os.environ.setdefault("OTEL_TRACES_SAMPLER", "always_on")  # the caller's OTEL_TRACES_SAMPLER[_ARG] win
    return server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.picker_cost", description=__doc__.split("\n\n")[0])
    numeric_flags(ap, requests=2000, concurrency=8, endpoints=8, prompt_chars=1000, envoy_concurrency=1)
    ap.add_argument("--modes", default="direct,full-duplex,buffered")
    ap.add_argument("--tls", action="store_true", help="picker serves TLS (self-signed), as by default in production")
    ap.add_argument("--transports", default="grpcio", help="comma-separated: grpcio, native")
    ap.add_argument("--tracing", choices=("off", "on"), default="off",
                    help="on: sample every request and export it over OTLP to a local sink")
    args = ap.parse_args(argv)
    sink = start_trace_sink() if args.tracing == "on" else None

    tmp = Path(tempfile.mkdtemp(prefix="epp-picker-cost-"))

    def measure(label: str, env, pid: int | None) -> None:
        with env:
            run_load(env.port, min(200, args.requests), args.concurrency, body)  # warm up
            idle_rate = 0.0
            if pid is not None:
                idle0, t_idle = cpu_seconds(pid), time.perf_counter()
                time.sleep(2.0)
                idle_rate = (cpu_seconds(pid) - idle0) / (time.perf_counter() - t_idle)
            c0 = cpu_seconds(pid) if pid is not None else 0.0
            seconds, lat = run_load(env.port, args.requests, args.concurrency, body)
            cpu = cpu_seconds(pid) - c0 if pid is not None else 0.0
            results.append(Result(label, args.requests, seconds, lat, cpu, idle_rate * seconds))
    prompt = ("The quick brown fox jumps over the lazy dog. " * (args.prompt_chars // 45 + 1))[:args.prompt_chars]
    body = json.dumps({"model": "m1", "prompt": prompt, "max_tokens": 1}).encode()
    results: list[Result] = []
    sims = start_sims(args.endpoints, model="m1", log_dir=tmp, time_scale=1000)  # stops itself if it fails
    try:
        modes = args.modes.split(",")
        if "direct" in modes:
            measure("direct", start_envoy("direct", backends=sims.hostports[:1], log_dir=tmp,
                                          concurrency=args.envoy_concurrency), None)
        transports = args.transports.split(",")
        for transport in transports:
            picker = start_picker(log_dir=tmp, endpoints=sims.hostports, tls=args.tls,
                                  extra_flags=[f"--ext-proc-transport={transport}", "--api-port=0",
                                               f"--tracing={str(sink is not None).lower()}"])
            try:
                for mode in modes:
                    if mode != "direct":
                        label = mode if len(transports) == 1 else f"{mode}/{transport}"
                        measure(label, start_envoy(mode, epp_port=picker.grpc_port, epp_tls=args.tls, log_dir=tmp,
                                                   concurrency=args.envoy_concurrency), picker.process.pid)
            finally:
                picker.stop()
    finally:
        sims.stop()
        if sink is not None:
            sink.stop(0)
    direct = next((r for r in results if r.mode == "direct"), None)
    print(f"endpoints={args.endpoints} requests={args.requests} concurrency={args.concurrency} "
          f"prompt_chars={args.prompt_chars} tls={args.tls} tracing={args.tracing} cores={os.cpu_count()} "
          f"loadavg={os.getloadavg()[0]:.1f}")
    print(f"{'mode':<21} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
          f"{'picker us/req':>14} {'minus idle':>11}")
    for r in results:
        add50 = (r.pct(0.5) - direct.pct(0.5)) * 1e3 if direct else float("nan")
        add99 = (r.pct(0.99) - direct.pct(0.99)) * 1e3 if direct else float("nan")
        per = r.picker_cpu / r.requests * 1e6 if r.mode != "direct" else 0.0
        net = (r.picker_cpu - r.picker_idle_cpu) / r.requests * 1e6 if r.mode != "direct" else 0.0
        print(f"{r.mode:<21} {r.rps:8.0f} {r.pct(0.5) * 1e3:8.2f} {r.pct(0.99) * 1e3:8.2f} {add50:8.2f} "
              f"{add99:8.2f} {per:14.0f} {net:11.0f}")
    print(f"median latency {statistics.median(results[0].latencies) * 1e3:.2f} ms ({results[0].mode}); logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
