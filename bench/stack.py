"""The real stack on 127.0.0.1 for benchmarks and the demo: `epp sim` servers, the picker
(`epp serve`) and the real Envoy, on free ports, each stopped by pid on every exit path.

Routing strategies through Envoy:
  envoy-round-robin     Envoy's ROUND_ROBIN over the servers (no picker)
  envoy-least-request   Envoy's LEAST_REQUEST
  envoy-random          Envoy's RANDOM
  picker                Envoy ext_proc (full duplex) -> the picker, default configuration
  picker-random         the picker with a random-picker configuration
  picker:<path>         the picker with that EndpointPickerConfig file
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.cluster import RANDOM_PICKER_CONFIG
from epp.envoy import Envoy, start_envoy
from epp.launch import Process, free_port, free_port_range, http_ok, wait_until

EPP = [sys.executable, "-m", "epp.cli"]
ENVOY_STRATEGIES = {"envoy-round-robin": "round-robin", "envoy-least-request": "least-request",
                    "envoy-random": "random"}
ROUTING_STRATEGIES = ("envoy-round-robin", "envoy-least-request", "picker-random", "picker")
STARTUP_TIMEOUT = 60.0


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of `name` on a Prometheus text page."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M):
        total += float(m.group(1))
    return total


@dataclass(slots=True)
class ServerCounts:
    """One simulator server's own counters (its /metrics)."""

    requests: float
    prefix_hits: float  # tokens
    prefix_queries: float

    def __sub__(self, other: ServerCounts) -> ServerCounts:
        return ServerCounts(self.requests - other.requests, self.prefix_hits - other.prefix_hits,
                            self.prefix_queries - other.prefix_queries)


def hit_rate(counts: Sequence[ServerCounts]) -> float:
    q = sum(c.prefix_queries for c in counts)
    return sum(c.prefix_hits for c in counts) / q if q else float("nan")


@dataclass
class SimServers:
    process: Process
    base_port: int
    n: int
    model: str

    @property
    def hostports(self) -> list[str]:
        return [f"127.0.0.1:{self.base_port + i}" for i in range(self.n)]

    def counts(self) -> list[ServerCounts]:
        out = []
        for hp in self.hostports:
            with urllib.request.urlopen(f"http://{hp}/metrics", timeout=5) as r:  # noqa: S310 - loopback
                text = r.read().decode()
            out.append(ServerCounts(metric_sum(text, "vllm:request_success_total"),
                                    metric_sum(text, "vllm:prefix_cache_hits_total"),
                                    metric_sum(text, "vllm:prefix_cache_queries_total")))
        return out

    def stop(self) -> None:
        self.process.stop()


def start_sims(n: int, *, model: str, time_scale: float, log_dir: Path, flags: Sequence[str] = ()) -> SimServers:
    base = free_port_range(n)
    argv = [*EPP, "sim", "--host", "127.0.0.1", "--port", str(base), "--model", model, "--replicas", str(n),
            "--time-scale", str(time_scale), *flags]
    proc = Process(argv, name="epp sim", log_path=log_dir / f"sim-{base}.log")
    sims = SimServers(proc, base, n, model)

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"epp sim exited: {proc.log_tail()}")
        return all(http_ok(f"http://{hp}/health") for hp in sims.hostports)

    try:
        wait_until(up, STARTUP_TIMEOUT, f"{n} simulator servers")
    except BaseException:
        proc.stop()
        raise
    return sims


def start_picker(endpoints: Sequence[str], config_text: str | None, log_dir: Path) -> tuple[Process, int]:
    grpc, health, metrics = free_port(), free_port(), free_port()
    argv = [*EPP, "serve", "--bind-address", "127.0.0.1", f"--grpc-port={grpc}", f"--grpc-health-port={health}",
            f"--metrics-port={metrics}", "--secure-serving=false", "--endpoints=" + ",".join(endpoints)]
    if config_text:
        path = log_dir / f"picker-config-{grpc}.yaml"
        path.write_text(config_text)
        argv.append(f"--config-file={path}")
    log = log_dir / f"picker-{grpc}.log"
    proc = Process(argv, name="epp serve", log_path=log)

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"epp serve exited: {proc.log_tail()}")
        return "epp: ready" in log.read_text(errors="replace")

    try:
        wait_until(ready, STARTUP_TIMEOUT, f"picker on port {grpc}")
    except BaseException:
        proc.stop()
        raise
    return proc, grpc


def picker_config(strategy: str) -> str | None:
    if strategy == "picker":
        return None
    if strategy == "picker-random":
        return RANDOM_PICKER_CONFIG
    if strategy.startswith("picker:"):
        path = strategy.partition(":")[2]
        try:
            return Path(path).read_text()
        except OSError as e:
            raise ValueError(f"strategy {strategy}: cannot read config: {e}") from None
    raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(ROUTING_STRATEGIES)}, envoy-random, "
                     "picker:<config file>)")


@dataclass
class Stack:
    url: str  # Envoy's listener
    sims: SimServers
    envoy: Envoy
    picker: Process | None


@contextlib.contextmanager
def stack(strategy: str, n: int, *, model: str, time_scale: float, sim_flags: Sequence[str] = (),
          log_dir: Path | None = None) -> Iterator[Stack]:
    """Fresh simulator servers (cold caches), the picker if the strategy needs one, and
    Envoy in front; everything stopped when the block exits, however it exits."""
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epp-bench-")
        log_dir = Path(tmp.name)
    config = None if strategy in ENVOY_STRATEGIES else picker_config(strategy)
    sims = picker = env = None
    try:
        sims = start_sims(n, model=model, time_scale=time_scale, log_dir=log_dir, flags=sim_flags)
        if strategy in ENVOY_STRATEGIES:
            env = start_envoy(ENVOY_STRATEGIES[strategy], backends=sims.hostports, log_dir=log_dir)
        else:
            picker, grpc = start_picker(sims.hostports, config, log_dir)
            env = start_envoy("full-duplex", epp_port=grpc, log_dir=log_dir)
        yield Stack(env.url, sims, env, picker)
    finally:
        for part in (env, picker, sims):
            if part is not None:
                part.stop()
        if tmp is not None:
            tmp.cleanup()
