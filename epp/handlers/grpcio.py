"""The grpc.aio ext_proc transport (`--ext-proc-transport=grpcio`): the
ExternalProcessor/Process method driving one epp.handlers.stream state machine per call.
While a request can be evicted in flight, each read races the eviction signal (one task
per message then; none otherwise)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest

from epp.handlers.protocol import NOT_LEADER_MESSAGE, SERVICE_NAME
from epp.handlers.stream import StreamProtocolError
from epp.handlers.transport import StreamHandler

log = logging.getLogger("epp.handlers.grpcio")


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class GrpcioServicer:
    """ExternalProcessor/Process over grpc.aio."""

    def __init__(self, handler: StreamHandler) -> None:
        self.handler = handler

    async def process(self, requests: AsyncIterator[ProcessingRequest], context: grpc.aio.ServicerContext) -> None:
        # context.read()/write() rather than an async generator: measurably less overhead per message.
        if not self.handler.serving():
            await context.abort(grpc.StatusCode.UNAVAILABLE, NOT_LEADER_MESSAGE)
        st = self.handler.new_stream()
        read, write, eof = context.read, context.write, grpc.aio.EOF
        evicted: asyncio.Future | None = None  # set by the evictor once the request is tracked in flight
        reading: asyncio.Future | None = None  # the pending read while an eviction may come
        try:
            while True:
                if not st.evictable:
                    msg = await read()
                else:  # evictable: the next message or the eviction, whichever comes first
                    if evicted is None:
                        evicted = asyncio.get_running_loop().create_future()
                        st.on_evict = functools.partial(_wake, evicted)
                    if st.evicted:
                        for reply in st.evict():
                            await write(reply)
                        return
                    if reading is None:
                        reading = asyncio.ensure_future(read())
                    await asyncio.wait((reading, evicted), return_when=asyncio.FIRST_COMPLETED)
                    if not reading.done():
                        continue
                    msg, reading = reading.result(), None
                if msg is eof:
                    return
                try:
                    r = st.handle(msg)
                except StreamProtocolError as e:
                    log.warning("ext_proc stream ended: protocol error: %s", e)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ext_proc protocol error: {e}")
                if r is None:
                    continue
                replies = r if r.__class__ is list else await r
                for reply in replies:
                    await write(reply)
                if st.finished:
                    return
        finally:
            if reading is not None:
                reading.cancel()
            st.close()

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Process": grpc.stream_stream_rpc_method_handler(
                self.process, request_deserializer=ProcessingRequest.FromString, response_serializer=None),
        })


def add_ext_proc_server(server: grpc.aio.Server, handler: StreamHandler) -> None:
    """Serve ext_proc on an existing grpc.aio server (it may carry other services too)."""
    server.add_generic_rpc_handlers((GrpcioServicer(handler).rpc_handler(),))


class GrpcioTransport:
    """ext_proc on its own grpc.aio server; `server` can take more services before start()."""

    def __init__(self, handler: StreamHandler, *, options: Sequence[tuple[str, object]] = (),
                 credentials: grpc.ServerCredentials | None = None) -> None:
        self.server = grpc.aio.server(options=options)
        self.credentials = credentials
        self.port = 0
        add_ext_proc_server(self.server, handler)

    async def start(self, host: str, port: int) -> int:
        address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.server.stop(grace)


__all__ = ["GrpcioServicer", "GrpcioTransport", "add_ext_proc_server"]
