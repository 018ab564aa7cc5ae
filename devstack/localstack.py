"""A local stack on 127.0.0.1 for tests, benchmarks and the demo: `epp sim` servers, the
picker (`epp serve`) and the real Envoy as child processes on free ports, each stopped by pid
on every exit path (devstack.launch.Process). A start that fails (the process exits, or is not
up in time) stops the process and raises with the tail of its log.

    with local_stack(4, model="m", time_scale=0.1) as st:          # sims + picker + Envoy
        ... st.url ...
    with local_stack(4, model="m", envoy_mode="round-robin") as st: # sims + Envoy, no picker
    with local_stack(4, model="m", replicas=2) as st:               # two pickers behind one Envoy
"""

from __future__ import annotations

import contextlib
import re
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devstack.envoy import LB_MODES, Envoy, start_envoy
from devstack.launch import (
    Process,
    free_port_range,
    free_ports,
    http_ok,
    on_fresh_ports,
    port_open,
    wait_until,
)

EPP = [sys.executable, "-m", "epp.cli"]
STARTUP_TIMEOUT = 60.0  # two busy cores shared with other jobs: be patient, never sleep blindly
HOST = "127.0.0.1"


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
        return r.read().decode()


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([^{ ]+)(\{[^}]*\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total




def _wait_started(proc: Process, up: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for up(), failing fast if the process exits; on any failure stop it and say why."""
    try:
        wait_until(lambda: not proc.alive() or up(), timeout, what)
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.proc.returncode}): {proc.log_tail()}")
    except BaseException as e:
        proc.stop()
        if isinstance(e, TimeoutError):
            raise TimeoutError(f"{e}\n{proc.log_tail()}") from None
        raise


# --------------------------------------------------------------------------- simulator
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
    """Prefix-cache hit rate in tokens over the servers (NaN if nothing was queried)."""
    q = sum(c.prefix_queries for c in counts)
    return sum(c.prefix_hits for c in counts) / q if q else float("nan")


@dataclass
class SimServers:
    """n replicas of one `epp sim` process on consecutive ports from base_port."""

    process: Process
    base_port: int
    n: int
    model: str
    kv_port: int | None = None  # first of n consecutive KV-events (ZMQ) ports, if enabled

    @property
    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(self.n)]

    @property
    def hostports(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.ports]

    def url(self, i: int = 0) -> str:
        return f"http://{HOST}:{self.base_port + i}"

    def metrics(self, i: int) -> str:
        return scrape(self.url(i) + "/metrics")

    def served(self, model: str | None = None) -> list[float]:
        """Requests each server completed (its own vllm:request_success_total)."""
        labels = {"model_name": model} if model else {}
        return [metric_sum(self.metrics(i), "vllm:request_success_total", **labels) for i in range(self.n)]

    def counts(self) -> list[ServerCounts]:
        out = []
        for i in range(self.n):
            text = self.metrics(i)
            out.append(ServerCounts(metric_sum(text, "vllm:request_success_total"),
                                    metric_sum(text, "vllm:prefix_cache_hits_total"),
                                    metric_sum(text, "vllm:prefix_cache_queries_total")))
        return out

    def stop(self) -> None:
        self.process.stop()


def flag_args(flags: Sequence[str] | Mapping[str, object]) -> list[str]:
    """argv from ["--flag", "value", ...] or {"flag_name": value} (-> --flag-name value)."""
    if isinstance(flags, Mapping):
        return [a for k, v in flags.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return list(flags)


def start_sims(n: int, *, model: str, log_dir: Path, time_scale: float = 1.0,
               flags: Sequence[str] | Mapping[str, object] = (), kv_events: bool = False, healthy: bool = True,
               name: str = "sim", timeout: float = STARTUP_TIMEOUT) -> SimServers:
    """One `epp sim --replicas n` process. Returns once every replica has printed its
    `sim ready:` line (listening) and, if `healthy`, answers /health with 200 (pass
    healthy=False for a server still in its --startup-delay)."""
    return on_fresh_ports(lambda: _start_sims_once(n, model, log_dir, time_scale, flags, kv_events, healthy, name,
                                                    timeout))


def _start_sims_once(n: int, model: str, log_dir: Path, time_scale: float,
                     flags: Sequence[str] | Mapping[str, object], kv_events: bool, healthy: bool, name: str,
                     timeout: float) -> SimServers:
    base = free_port_range(n)
    kv_port = free_port_range(n) if kv_events else None
    argv = [*EPP, "sim", "--host", HOST, "--port", str(base), "--model", model, "--replicas", str(n),
            "--time-scale", str(time_scale), *flag_args(flags)]
    if kv_port:
        argv += ["--kv-events-endpoint", f"tcp://{HOST}:{kv_port}"]
    log = Path(log_dir) / f"{name}-{base}.log"
    proc = Process(argv, name=name, log_path=log)
    sims = SimServers(proc, base, n, model, kv_port)

    def up() -> bool:
        if log.read_text(errors="replace").count("sim ready:") < n:
            return False
        return not healthy or all(http_ok(u + "/health") for u in map(sims.url, range(n)))

    _wait_started(proc, up, timeout, f"{n} simulator servers on ports {base}-{base + n - 1}")
    return sims


# --------------------------------------------------------------------------- picker
@dataclass
class PickerProcess:
    """`epp serve` on fixed ports: start() again after kill() comes back on the same ports,
    so an Envoy pointed at grpc_port keeps its configuration."""

    argv: list[str]
    grpc_port: int
    health_port: int
    metrics_port: int
    api_port: int  # the project API (ListEndpoints, Explain), on its own port in every transport
    tls: bool
    log_dir: Path
    process: Process | None = None
    starts: int = 0

    def start(self, timeout: float = STARTUP_TIMEOUT) -> PickerProcess:
        self.starts += 1
        log = self.log_dir / f"picker-{self.grpc_port}-{self.starts}.log"
        proc = self.process = Process(self.argv, name="epp serve", log_path=log)
        _wait_started(proc, lambda: "epp: ready" in log.read_text(errors="replace"), timeout,
                      f"picker on port {self.grpc_port}")
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            wait_until(lambda: not port_open(self.grpc_port), 10, "picker port to close")

    def restart(self) -> PickerProcess:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def metrics(self) -> str:
        return scrape(f"http://{HOST}:{self.metrics_port}/metrics")

    def log(self, n: int = 400) -> str:
        """The tail of the current run's log."""
        return self.process.log_tail(n) if self.process else ""


def start_picker(*, log_dir: Path, endpoints: Sequence[str] = (), endpoints_file: str | Path = "",
                 config_text: str | None = None, extra_flags: Sequence[str] = (), tls: bool = False,
                 timeout: float = STARTUP_TIMEOUT) -> PickerProcess:
    """`epp serve` on free gRPC/health/metrics ports of 127.0.0.1, its configuration (if any)
    written to a file in log_dir; returns once it logs `epp: ready`."""
    return on_fresh_ports(lambda: _start_picker_once(log_dir, endpoints, endpoints_file, config_text, extra_flags,
                                                      tls, timeout))


def _start_picker_once(log_dir: str | Path, endpoints: Sequence[str], endpoints_file: str | Path,
                       config_text: str | None, extra_flags: Sequence[str], tls: bool, timeout: float) -> PickerProcess:
    grpc, health, metrics, api = free_ports(4)
    log_dir = Path(log_dir)
    # Tracing off unless asked for: the reference's default samples 10% and prints spans to stdout.
    argv = [*EPP, "serve", "--bind-address", HOST, f"--grpc-port={grpc}", f"--grpc-health-port={health}",
            f"--metrics-port={metrics}", f"--api-port={api}", f"--secure-serving={str(tls).lower()}",
            "--drain-timeout=0", "--tracing=false"]
    if endpoints:
        argv.append("--endpoints=" + ",".join(endpoints))
    if endpoints_file:
        argv.append(f"--endpoints-file={endpoints_file}")
    if config_text:
        path = log_dir / f"picker-config-{grpc}.yaml"
        path.write_text(config_text)
        argv.append(f"--config-file={path}")
    argv += extra_flags
    return PickerProcess(argv, grpc, health, metrics, api, tls, log_dir).start(timeout)


# --------------------------------------------------------------------------- the whole stack
@dataclass
class LocalStack:
    url: str  # Envoy's listener
    sims: SimServers
    envoy: Envoy
    picker: PickerProcess | None  # None when Envoy balances by itself (an LB mode); else the first replica
    pickers: list[PickerProcess] = field(default_factory=list)  # every replica, in Envoy's ext_proc cluster


@contextlib.contextmanager
def local_stack(n: int, *, model: str, time_scale: float = 1.0, envoy_mode: str = "full-duplex",
                config_text: str | Callable[[int], str] | None = None, picker_flags: Sequence[str] = (),
                sim_flags: Sequence[str] | Mapping[str, object] = (), replicas: int = 1,
                log_dir: Path | None = None) -> Iterator[LocalStack]:
    """Fresh simulator servers (cold caches), the picker unless `envoy_mode` is one of Envoy's
    own load balancers (devstack.envoy.LB_MODES), and Envoy in front; everything stopped
    when the block exits, however it exits. `replicas` pickers (each on its own ports; a
    callable config_text gives replica i its own configuration) share Envoy's ext_proc
    cluster, as several EPP pods behind one Service."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="epp-stack-")
        log_dir = Path(tmp.name)
    sims = env = None
    pickers: list[PickerProcess] = []
    try:
        sims = start_sims(n, model=model, time_scale=time_scale, log_dir=log_dir, flags=sim_flags)
        if envoy_mode in LB_MODES:
            env = start_envoy(envoy_mode, backends=sims.hostports, log_dir=log_dir)
        else:
            for i in range(replicas):
                text = config_text(i) if callable(config_text) else config_text
                pickers.append(start_picker(endpoints=sims.hostports, config_text=text, extra_flags=picker_flags,
                                            log_dir=log_dir))
            env = start_envoy(envoy_mode, epp_port=[p.grpc_port for p in pickers], log_dir=log_dir)
        yield LocalStack(env.url, sims, env, pickers[0] if pickers else None, pickers)
    finally:
        for part in (env, *pickers, sims):
            if part is not None:
                part.stop()
        if tmp is not None:
            tmp.cleanup()
