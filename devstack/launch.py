"""Starting and stopping local processes for tests, benchmarks and the demo.

Every server binds 127.0.0.1 on a port picked free by the caller; every process
started here is stopped by its pid on every exit path (normal return, exception,
Ctrl-C, SIGTERM, interpreter exit)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

_LIVE: dict[int, subprocess.Popen] = {}


T = TypeVar("T")
PORT_RACE_ATTEMPTS = 3  # starts on fresh ports when one found free was taken before the bind


def on_fresh_ports(start: Callable[[], T]) -> T:
    """start(), again (it picks new ports each time) when a port found free was taken before
    the process bound it (e.g. as another connection's ephemeral source port): start raises
    RuntimeError with the exited process's log tail, which says "address already in use"."""
    for attempt in range(PORT_RACE_ATTEMPTS):
        try:
            return start()
        except RuntimeError as e:
            if "address already in use" not in str(e).lower() or attempt + 1 == PORT_RACE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(n: int, attempts: int = 50) -> int:
    """First port of n consecutive ports free on 127.0.0.1 (for `epp sim --replicas`)."""
    for _ in range(attempts):
        base = free_port()
        if base + n >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll until predicate() is true or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as e:  # noqa: BLE001 - polling a server that is still starting
            last_error = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {last_error}" if last_error else ""))
        time.sleep(interval)


def http_ok(url: str, timeout: float = 1.0) -> bool:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return 200 <= r.status < 300


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class Process:
    """A child process in its own process group, stopped (TERM, then KILL) by pid."""

    def __init__(self, argv: Sequence[str], name: str, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path) if log_path else None
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()
        _LIVE[self.proc.pid] = self.proc
        _install_handlers()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 5.0) -> None:
        _stop(self.proc, timeout)
        _LIVE.pop(self.proc.pid, None)

    def kill(self) -> None:
        """Hard kill (SIGKILL), as a crash would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        _LIVE.pop(self.proc.pid, None)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def stop_all() -> None:
    for pid, proc in list(_LIVE.items()):
        _stop(proc, 3.0)
        _LIVE.pop(pid, None)


_installed = False


def _install_handlers() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(stop_all)
    try:
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):
            stop_all()
            if callable(previous):
                previous(signum, frame)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass


def envoy_binary() -> str:
    """The Envoy binary kept outside the runtime environment (see Makefile)."""
    candidates = [os.environ.get("EPP_ENVOY_BIN", ""),
                  str(Path(__file__).resolve().parent.parent / ".tools/envoy/envoy/_bin/envoy"),
                  shutil.which("envoy") or ""]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("Envoy binary not found: run `make setup` (or set EPP_ENVOY_BIN)")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (children not counted)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # fields 14 and 15 of proc(5)


def python_module_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
