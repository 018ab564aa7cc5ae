"""The one interface between the ext_proc state machine and a transport (as httpx's
transports sit behind one small interface): a transport accepts ext_proc streams, asks
the handler for a state machine per stream and drives it through `handle`, `finished`
and `close`; the server starts and stops any transport the same way."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest


class Stream(Protocol):
    """One ext_proc stream's state machine (epp.handlers.stream.ExtProcStream)."""

    finished: bool  # done: the transport ends the RPC with OK
    evictable: bool  # routed and evictable in flight: the transport must be able to answer on_evict
    evicted: str  # the evictor ended the request (its dropped reason): send evict() and end the RPC
    on_evict: Callable[[], None] | None  # set by the transport: called (on its own loop turn) when evicted

    def evict(self) -> list[bytes]:
        """The replies that end an evicted request; `finished` is true after."""
        ...

    def handle(self, msg: ProcessingRequest) -> list[bytes] | Coroutine[Any, Any, list[bytes]] | None:
        """Replies (serialised ProcessingResponse), or a coroutine giving them, or None to
        ignore the message; raises StreamProtocolError for a message out of order (the
        transport then ends the stream with gRPC status INVALID_ARGUMENT)."""
        ...

    def close(self) -> None:
        """Runs exactly once when the stream ends in any way: releases what it holds."""
        ...


class StreamHandler(Protocol):
    """Opens streams (epp.handlers.stream.ExtProcHandler)."""

    serving: Callable[[], bool]  # false: refuse streams with UNAVAILABLE (a follower)
    max_request_body_bytes: int  # a transport's message limit must let a body this large through

    def new_stream(self) -> Stream: ...


class Transport(Protocol):
    """An ext_proc server: grpcio (epp.handlers.grpcio) or native HTTP/2 (epp.handlers.h2)."""

    port: int

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port."""
        ...

    async def stop(self, grace: float = 2.0) -> None:
        """Stop listening; in-flight streams get `grace` seconds, then are cancelled."""
        ...


__all__ = ["Stream", "StreamHandler", "Transport"]
