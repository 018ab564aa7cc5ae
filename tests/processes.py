"""Process-tree checks for commands that start a local stack: Ctrl-C must stop every child."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from devstack.launch import wait_until


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


def interrupt_when(argv: Sequence[str], ready: str, log: Path, cwd: Path, min_children: int = 3) -> str:
    """Run argv; once its output shows `ready` (the stack up and serving), send SIGINT and
    check it exits 130 and that every child it started is gone. Returns the output."""
    with open(log, "wb") as out:
        run = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    seen: set[int] = set()
    try:
        def serving() -> bool:
            seen.update(children(run.pid))
            if run.poll() is not None:
                raise RuntimeError(f"exited early: {log.read_text()}")
            return ready in log.read_text()

        wait_until(serving, 90, f"{ready!r} in the output", interval=0.1)
        seen.update(children(run.pid))
        assert len(seen) >= min_children, f"expected sim, picker and envoy children, saw {seen}"
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=30) == 130, log.read_text()
        wait_until(lambda: not any(alive(p) for p in seen), 10, "every child to exit")
        return log.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for p in seen:
            if alive(p):
                os.kill(p, signal.SIGKILL)
