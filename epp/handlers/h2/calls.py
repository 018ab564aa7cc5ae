"""One gRPC call on the native transport (an HTTP/2 stream) and the driver that finishes
a state-machine coroutine which had to wait (admission) outside the frame loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from epp.handlers.h2.frames import STREAM_WINDOW
from epp.handlers.transport import Stream


class Call:
    """One gRPC call (HTTP/2 stream)."""

    __slots__ = ("sid", "st", "inbuf", "send_window", "outq", "trailers", "headers_sent", "remote_closed",
                 "closed", "released", "task", "started", "recv_window", "credit", "reject")

    def __init__(self, sid: int, st: Stream | None, send_window: int) -> None:
        self.sid = sid
        self.st = st  # the ext_proc state machine (None: the call is refused, see `reject`)
        self.inbuf = bytearray()
        self.send_window = send_window
        self.outq: list[bytes | memoryview] = []  # framed gRPC bytes waiting for send window
        self.trailers: bytes | None = None  # sent once outq drains
        self.headers_sent = False
        self.remote_closed = False  # the client sent END_STREAM
        self.closed = False  # our side is done (trailers queued, or cancelled)
        self.released = False  # st.close() ran
        self.task: asyncio.Task | None = None  # a handler waiting (admission)
        self.started = False  # the task began running (before that, cancel() would not reach the handler)
        self.recv_window = STREAM_WINDOW
        self.credit = 0  # bytes received but not yet returned with WINDOW_UPDATE
        self.reject: tuple[int, str] | None = None  # (grpc-status, message) to end with once the client sends


async def drive(coro: Coroutine[Any, Any, list[bytes]], waiting: Any, call: Call) -> list[bytes]:
    """Drive a handler coroutine that suspended (on `waiting`) while first run inline, as a
    Task would: the common path (no admission wait) needs no Task at all. A cancel of this
    task is thrown into the handler at its await, also one that came before this task ran."""
    call.started = True
    exc: BaseException | None = asyncio.CancelledError() if call.closed else None
    while True:
        if exc is None:
            try:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    waiting._asyncio_future_blocking = False  # as Task.__step does before waiting on it
                    await waiting
            except BaseException as e:  # noqa: BLE001 - CancelledError (or the future's error) goes to the handler
                exc = e
        try:
            if exc is None:
                waiting = coro.send(None)
            else:
                e, exc = exc, None
                waiting = coro.throw(e)
        except StopIteration as stop:
            return stop.value


__all__ = ["Call", "drive"]
