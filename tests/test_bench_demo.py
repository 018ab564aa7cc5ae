"""`epp demo` leaves no process behind when interrupted with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.launch import wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> set[int]:
    """Every live descendant of pid (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in parents.get(todo.pop(), ()):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ctrl_c_stops_every_process(tmp_path):
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "epp.cli", "demo", "--servers", "2", "--requests", "500",
                                 "--rate", "2", "--no-plots", "--out", str(tmp_path)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seen: set[int] = set()
    try:
        # Mid-run: simulator servers, the picker and Envoy are all up and serving.
        def serving() -> bool:
            seen.update(children(demo.pid))
            if demo.poll() is not None:
                raise RuntimeError(f"demo exited early: {log.read_text()}")
            return "sending 500 requests" in log.read_text()

        wait_until(serving, 90, "the demo to start its first phase", interval=0.1)
        seen.update(children(demo.pid))
        assert len(seen) >= 3, f"expected sim, picker and envoy children, saw {seen}"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 130, log.read_text()
        wait_until(lambda: not any(alive(p) for p in seen), 10, "every child of the demo to exit")
        assert "interrupted" in log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for p in seen:
            if alive(p):
                os.kill(p, signal.SIGKILL)
