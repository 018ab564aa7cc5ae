"""End-to-end fixtures: real `epp sim` servers, the picker as an `epp serve` subprocess and
the real Envoy 1.40 binary, all on free 127.0.0.1 ports, stopped by pid on every exit path.

Reusable factories (each cleans up what it started at the end of its scope; on a test
failure the tail of every log is printed):

    sims = sim_servers(3, model="m1", time_scale=20)        # module scope: module_sim_servers
    p = picker(endpoints=sims.hostports, config_text=..., extra_flags=[...], tls=True)
    env = envoy("full-duplex", p)                            # or "buffered", "override-host"
    p.restart()  /  p.kill()  /  p.start()                   # same ports: Envoy keeps its config
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from epp.envoy import Envoy, start_envoy
from epp.launch import Process, free_port, free_port_range, http_ok, port_open, wait_until

EPP = [sys.executable, "-m", "epp.cli"]
STARTUP_TIMEOUT = 60.0  # two busy cores, several helpers: be patient, but never sleep blindly


def _scrape(url: str) -> str:
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


# --------------------------------------------------------------------------- logs
class Logs:
    """Every process log of a test, shown when the test fails."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="epp-e2e-"))
        self.processes: list[tuple[str, Callable[[], str]]] = []

    def add(self, name: str, tail: Callable[[], str]) -> None:
        self.processes.append((name, tail))

    def dump(self) -> None:
        for name, tail in self.processes:
            print(f"----- {name} (last lines) -----\n{tail()}")

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    if request.scope == "module":
        return any(getattr(i, "rep_call", None) is not None and i.rep_call.failed
                   for i in request.session.items if i.module is request.module)
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def e2e_logs(request: pytest.FixtureRequest) -> Iterator[Logs]:
    logs = Logs()
    yield logs
    if _failed(request):
        logs.dump()
    logs.cleanup()


# --------------------------------------------------------------------------- simulator
@dataclass
class SimServers:
    process: Process
    base_port: int
    n: int
    model: str

    @property
    def ports(self) -> list[int]:
        return [self.base_port + i for i in range(self.n)]

    @property
    def hostports(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def metrics(self, i: int) -> str:
        return _scrape(f"http://127.0.0.1:{self.base_port + i}/metrics")

    def served(self, model: str | None = None) -> list[float]:
        """Requests each server completed (its own vllm:request_success_total)."""
        labels = {"model_name": model} if model else {}
        return [metric_sum(self.metrics(i), "vllm:request_success_total", **labels) for i in range(self.n)]

    def stop(self) -> None:
        self.process.stop()


def _start_sims(logs: Logs, n: int, model: str, time_scale: float, flags: dict[str, Any]) -> SimServers:
    base = free_port_range(n)
    argv = [*EPP, "sim", "--host", "127.0.0.1", "--port", str(base), "--model", model, "--replicas", str(n),
            "--time-scale", str(time_scale)]
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    proc = Process(argv, name="sim", log_path=logs.dir / f"sim-{base}.log")
    logs.add(f"sim :{base}", proc.log_tail)
    sims = SimServers(proc, base, n, model)

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"epp sim exited: {proc.log_tail()}")
        return all(http_ok(f"http://127.0.0.1:{p}/health") for p in sims.ports)

    try:
        wait_until(up, STARTUP_TIMEOUT, f"{n} simulator servers")
    except BaseException:
        proc.stop()
        raise
    return sims


@pytest.fixture
def sim_servers(e2e_logs: Logs) -> Iterator[Callable[..., SimServers]]:
    started: list[SimServers] = []

    def factory(n: int = 3, *, model: str = "m1", time_scale: float = 20.0, **flags: Any) -> SimServers:
        sims = _start_sims(e2e_logs, n, model, time_scale, flags)
        started.append(sims)
        return sims

    try:
        yield factory
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def module_sim_servers(request: pytest.FixtureRequest) -> Iterator[SimServers]:
    """Three `m1` simulator servers shared by a module's tests (count with deltas)."""
    logs = Logs()
    sims = _start_sims(logs, 3, "m1", 20.0, {})
    try:
        yield sims
    finally:
        sims.stop()
        if _failed(request):
            logs.dump()
        logs.cleanup()


# --------------------------------------------------------------------------- picker
@dataclass
class Picker:
    argv: list[str]
    grpc_port: int
    health_port: int
    metrics_port: int
    tls: bool
    logs: Logs
    process: Process | None = None
    starts: int = 0
    files: list[Path] = field(default_factory=list)

    def start(self, timeout: float = STARTUP_TIMEOUT) -> Picker:
        self.starts += 1
        log_path = self.logs.dir / f"picker-{self.grpc_port}-{self.starts}.log"
        proc = self.process = Process(self.argv, name="epp serve", log_path=log_path)
        self.logs.add(f"picker :{self.grpc_port} #{self.starts}", proc.log_tail)

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"epp serve exited ({proc.proc.returncode}): {proc.log_tail()}")
            return "epp: ready" in log_path.read_text(errors="replace")

        try:
            wait_until(ready, timeout, f"picker on port {self.grpc_port}")
        except BaseException:
            proc.stop()
            raise
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            wait_until(lambda: not port_open(self.grpc_port), 10, "picker port to close")

    def restart(self) -> Picker:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def metrics(self) -> str:
        return _scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def log(self) -> str:
        return self.process.log_tail(400) if self.process else ""


@pytest.fixture
def picker(e2e_logs: Logs) -> Iterator[Callable[..., Picker]]:
    started: list[Picker] = []

    def factory(*, endpoints: Sequence[str] = (), endpoints_file: str = "", config_text: str = "",
                extra_flags: Sequence[str] = (), tls: bool = False) -> Picker:
        ports = [free_port() for _ in range(3)]
        argv = [*EPP, "serve", "--bind-address", "127.0.0.1", f"--grpc-port={ports[0]}",
                f"--grpc-health-port={ports[1]}", f"--metrics-port={ports[2]}", f"--secure-serving={str(tls).lower()}",
                "--refresh-metrics-interval=50ms"]
        if endpoints:
            argv.append("--endpoints=" + ",".join(endpoints))
        if endpoints_file:
            argv.append(f"--endpoints-file={endpoints_file}")
        if config_text:
            path = e2e_logs.dir / f"config-{ports[0]}.yaml"
            path.write_text(config_text)
            argv.append(f"--config-file={path}")
        argv += list(extra_flags)
        p = Picker(argv, *ports, tls=tls, logs=e2e_logs)
        started.append(p)
        return p.start()

    try:
        yield factory
    finally:
        for p in started:
            p.stop()


# --------------------------------------------------------------------------- envoy
@pytest.fixture
def envoy(e2e_logs: Logs) -> Iterator[Callable[..., Envoy]]:
    started: list[Envoy] = []

    def factory(mode: str, picker: Picker, **kw: Any) -> Envoy:
        env = start_envoy(mode, epp_port=picker.grpc_port, epp_tls=picker.tls, log_dir=e2e_logs.dir, **kw)
        started.append(env)
        e2e_logs.add(f"envoy {mode} :{env.port}", env.process.log_tail)
        return env

    try:
        yield factory
    finally:
        for env in started:
            env.stop()
