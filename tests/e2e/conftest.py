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

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.envoy import Envoy, start_envoy
from devstack.localstack import PickerProcess, SimServers, metric_sum, start_picker, start_sims

Picker = PickerProcess
__all__ = ["Logs", "Picker", "SimServers", "_failed", "_start_sims", "metric_sum"]  # imported by the tests


# --------------------------------------------------------------------------- logs
class Logs:
    """A directory for every process log of a test; their tails are shown when it fails."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="epp-e2e-"))

    def dump(self) -> None:
        for path in sorted(self.dir.glob("*.log"), key=lambda p: p.stat().st_mtime):
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-40:])
            print(f"----- {path.name} (last lines) -----\n{tail}")

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
def _start_sims(logs: Logs, n: int, model: str, time_scale: float, flags: dict[str, Any]) -> SimServers:
    return start_sims(n, model=model, time_scale=time_scale, flags=flags, log_dir=logs.dir)


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
@pytest.fixture
def picker(e2e_logs: Logs) -> Iterator[Callable[..., Picker]]:
    started: list[Picker] = []

    def factory(*, endpoints: Sequence[str] = (), endpoints_file: str = "", config_text: str = "",
                extra_flags: Sequence[str] = (), tls: bool = False) -> Picker:
        p = start_picker(endpoints=endpoints, endpoints_file=endpoints_file, config_text=config_text,
                         extra_flags=["--refresh-metrics-interval=50ms", *extra_flags], tls=tls,
                         log_dir=e2e_logs.dir)
        started.append(p)
        return p

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
        return env

    try:
        yield factory
    finally:
        for env in started:
            env.stop()


def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """POST JSON (or raw bytes); (status, lowercased headers, body). A connection error or
    timeout is reported as status 0 so concurrent callers can count it."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        return 0, {}, repr(e).encode()


def health(port: int, service: str) -> int:
    """The picker's gRPC health status of `service` ("" for the server as a whole)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
