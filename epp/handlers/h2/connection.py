"""One HTTP/2 connection of the native ext_proc transport: frames in, gRPC messages through
each stream's state machine (epp.handlers.transport.Stream), frames out.

RFC 9113 server side, as Envoy's ext_proc client uses it: preface and SETTINGS both ways,
PING, graceful GOAWAY, flow control both ways, HEADERS + CONTINUATION with PADDED and
PRIORITY flags, HPACK (epp.handlers.h2.hpack). Connection errors get GOAWAY with their
code and close the connection (its streams are cancelled and released); stream errors
get RST_STREAM. Bounds (epp.handlers.h2.frames): concurrent streams, header-block bytes and
frames, a write high-water mark above which reading pauses, handshake and idle timeouts.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest
from google.protobuf.message import DecodeError

from epp.handlers.h2.calls import Call, drive
from epp.handlers.h2.frames import (
    ACK,
    CLOSE_LINGER,
    COMPRESSION_ERROR,
    CONNECTION_WINDOW,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_HEAD,
    FRAME_SIZE_ERROR,
    HEADERS,
    INTERNAL,
    INTERNAL_ERROR,
    INVALID_ARGUMENT,
    MAX_HEADER_FRAMES,
    MAX_WINDOW,
    MESSAGE_HEAD,
    NO_ERROR,
    OK,
    OUR_MAX_FRAME,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RESOURCE_EXHAUSTED,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_FRAME_SIZE,
    SETTING,
    SETTINGS,
    SETTINGS_ACK,
    STREAM_CLOSED,
    STREAM_WINDOW,
    U32,
    UNAVAILABLE,
    UNIMPLEMENTED,
    UNKNOWN,
    WINDOW_UPDATE,
    ConnectionError_,
    frame,
    goaway,
    grpc_message,
    rst_stream,
)
from epp.handlers.h2.hpack import Decoder, HpackError, encode_literal
from epp.handlers.protocol import METHOD_PATH, NOT_LEADER_MESSAGE
from epp.handlers.stream import StreamProtocolError

if TYPE_CHECKING:
    from epp.handlers.h2.server import H2GrpcServer

log = logging.getLogger("epp.handlers.h2")

_STATUS_200 = b"\x88"  # indexed :status 200
_RESPONSE_HEADERS = _STATUS_200 + encode_literal("content-type", "application/grpc")
_TRAILERS_OK = encode_literal("grpc-status", "0")
_STATUS_415 = b"\x0d\x03415"  # literal :status 415 (indexed name)
SHUTDOWN_PING = b"epp-stop"


def _trailers(status: int, message: str) -> bytes:
    return encode_literal("grpc-status", str(status)) + encode_literal("grpc-message", grpc_message(message))


class H2Connection(asyncio.Protocol):
    def __init__(self, server: H2GrpcServer) -> None:
        self.server = server
        self.limits = server.limits
        self.handler = server.handler
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()  # bytes of an incomplete frame (or preface) carried to the next read
        self.preface = False
        self.settings_seen = False  # the client's first SETTINGS arrived: the handshake is done
        self.out: list[bytes | memoryview] = []
        self.calls: dict[int, Call] = {}
        self.blocked: dict[int, Call] = {}  # calls with DATA waiting for send window, in order
        self.decoder = Decoder()
        self.last_sid = 0
        self.peer_window = DEFAULT_WINDOW  # peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.send_window = DEFAULT_WINDOW  # connection-level send window
        self.recv_window = CONNECTION_WINDOW
        self.conn_credit = 0
        self.continuation: tuple[int, int, bytearray] | None = None  # (sid, flags, block) until END_HEADERS
        self.continuation_frames = 0
        self.goaway_sid: int | None = None  # final GOAWAY sent: no stream above this
        self.draining = False  # shutting down: the final GOAWAY follows the PING ack
        self.peer_goaway = False
        self.closing = False  # a connection error: GOAWAY sent, closing
        self.lost = False
        self.eof_sent = False  # after a connection error: nothing more is written
        self.idle_mark = -1  # last_sid at the previous idle check
        self.timer: asyncio.TimerHandle | None = None  # handshake, then idle timeout

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        transport.set_write_buffer_limits(self.limits.write_high_water, self.limits.write_low_water)  # type: ignore[attr-defined]
        transport.write(self.server.settings + self.server.window_update)  # type: ignore[attr-defined]
        self.timer = self.loop.call_later(self.limits.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
        for call in list(self.calls.values()):
            self._cancel(call)
        self.server.connections.discard(self)
        self.server.connection_closed()

    def pause_writing(self) -> None:
        """The socket's write buffer is over the high-water mark (a peer that does not
        read): read nothing more until it drains, so no new replies pile up."""
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.lost and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        buf = self.buf
        if buf:
            buf += data  # an incomplete frame grows in place: no copy of what came before
            view: bytes | bytearray = buf
        else:
            view = data
        pos = 0
        try:
            if not self.preface:
                if len(view) < 24:
                    if not PREFACE.startswith(view):
                        raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    if not buf:
                        buf += data
                    return
                if view[:24] != PREFACE:
                    raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                pos = 24
                self.preface = True
            pos = self._frames(view, pos)
            if buf:
                del buf[:pos]
            elif pos < len(data):
                buf += memoryview(data)[pos:]
        except ConnectionError_ as e:
            log.warning("HTTP/2 connection error %d: %s", e.code, e)
            self._fail(e.code, str(e))
        except HpackError as e:
            log.warning("HPACK error: %s", e)
            self._fail(COMPRESSION_ERROR, str(e))
        except Exception:  # noqa: BLE001 - a bug here must cost this connection only, with its streams released
            log.exception("HTTP/2 connection failed")
            self._fail(INTERNAL_ERROR, "internal error")
        self._drain()

    def _frames(self, buf: bytes | bytearray, pos: int) -> int:
        """Handle every complete frame in buf from pos; returns where the rest starts."""
        n = len(buf)
        if not self.settings_seen and n - pos >= 9:  # the client's preface ends with SETTINGS
            if buf[pos + 3] != SETTINGS or buf[pos + 4] & ACK:
                raise ConnectionError_(PROTOCOL_ERROR, "the first frame must be SETTINGS")
            self.settings_seen = True
            self._handshake_done()
        handlers = self._handlers
        while n - pos >= 9 and not self.closing:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > OUR_MAX_FRAME:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes over {OUR_MAX_FRAME}")
            end = pos + 9 + length
            if end > n:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = U32.unpack_from(buf, pos + 5)[0] & MAX_WINDOW
            payload = buf[pos + 9:end]  # bytes, or a bytearray when the frame came in pieces
            pos = end
            if self.continuation is not None and ftype != CONTINUATION:
                raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
            if ftype < 10:
                handlers[ftype](self, flags, sid, payload)
            # unknown frame types are ignored (RFC 9113 5.5)
        return pos

    def _drain(self) -> None:
        if self.out and self.transport is not None and not self.lost and not self.eof_sent:
            out = self.out
            self.out = []
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _fail(self, code: int, message: str) -> None:
        """GOAWAY, then a lingering close: our side ends with FIN while the peer's remaining
        bytes are read and dropped (closing with them unread would send a TCP RST, which can
        destroy the GOAWAY before the peer reads it); aborted after CLOSE_LINGER."""
        self.closing = True
        self.buf = bytearray()
        self.out.append(goaway(self.last_sid, code, message))
        self._drain()
        for call in list(self.calls.values()):
            self._cancel(call)
        transport = self.transport
        if transport is None or self.lost:
            return
        if transport.can_write_eof():
            transport.write_eof()
            self.eof_sent = True
            transport.resume_reading()
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(CLOSE_LINGER, transport.abort)
        else:
            transport.close()

    def eof_received(self) -> bool:
        return False  # the peer is done sending: close (after what we wrote is flushed)

    # ------------------------------------------------------------------ timeouts
    def _handshake_expired(self) -> None:
        self.timer = None
        if not self.settings_seen and not self.lost:
            log.warning("HTTP/2 handshake not completed within %gs: connection closed",
                        self.limits.handshake_timeout)
            self.closing = True
            if self.transport is not None:
                self.transport.abort()

    def _handshake_done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.idle_mark = self.last_sid
        self.timer = self.loop.call_later(self.limits.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """One timer per connection, every idle_timeout (nothing per stream): a connection with
        no stream open now and none opened since the last check is closed, so after between
        one and two idle_timeouts without streams."""
        self.timer = None
        if self.lost or self.closing:
            return
        if not self.calls and self.last_sid == self.idle_mark:
            log.info("HTTP/2 connection idle for %gs: closed", self.limits.idle_timeout)
            self.goaway_sid = self.last_sid
            self.out.append(goaway(self.last_sid, NO_ERROR, "idle"))
            self._close_when_idle()
            return
        self.idle_mark = self.last_sid
        self.timer = self.loop.call_later(self.limits.idle_timeout, self._idle_check)

    # ------------------------------------------------------------------ frames
    def _idle_stream(self, sid: int) -> bool:
        """A stream id the client has not opened yet (RFC 9113 5.1 'idle'); even ids are ours."""
        return sid > self.last_sid or not sid & 1

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "connection receive window exceeded")
        self.conn_credit += size
        if self.conn_credit >= CONNECTION_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.conn_credit)))
            self.recv_window += self.conn_credit
            self.conn_credit = 0
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        if flags & PADDED:
            if not payload or payload[0] >= size:
                raise ConnectionError_(PROTOCOL_ERROR, "bad DATA padding")
            payload = payload[1:size - payload[0]]
        call = self.calls.get(sid)
        if call is None:
            if self._idle_stream(sid):
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # a stream we already finished or reset: its late frames are dropped
        if call.remote_closed:
            self._reset(call, STREAM_CLOSED)
            return
        call.recv_window -= size
        if call.recv_window < 0:
            self._reset(call, FLOW_CONTROL_ERROR)
            return
        call.credit += size
        if call.closed:
            return  # we already answered; the client's last bytes are dropped
        if payload:
            call.inbuf += payload
        if flags & END_STREAM:
            call.remote_closed = True
        self._pump(call)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if len(payload) > self.limits.max_header_block:  # checked here as for CONTINUATION: one frame can be 1 MiB
            raise ConnectionError_(COMPRESSION_ERROR, f"header block over {self.limits.max_header_block} bytes")
        pad = 0
        if flags & PADDED:
            if not payload:
                raise ConnectionError_(PROTOCOL_ERROR, "bad HEADERS padding")
            pad = payload[0]
            payload = payload[1:]
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionError_(FRAME_SIZE_ERROR, "HEADERS priority fields missing")
            payload = payload[5:]
        if pad:
            if pad > len(payload):
                raise ConnectionError_(PROTOCOL_ERROR, "bad HEADERS padding")
            payload = payload[:len(payload) - pad]
        if flags & END_HEADERS:
            self._header_block(sid, flags, payload)
        else:
            self.continuation = (sid, flags, bytearray(payload))
            self.continuation_frames = 0

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        cont = self.continuation
        if cont is None or cont[0] != sid:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        if len(cont[2]) + len(payload) > self.limits.max_header_block:
            raise ConnectionError_(COMPRESSION_ERROR, f"header block over {self.limits.max_header_block} bytes")
        self.continuation_frames += 1
        if self.continuation_frames > MAX_HEADER_FRAMES:
            raise ConnectionError_(ENHANCE_YOUR_CALM, f"header block in over {MAX_HEADER_FRAMES} CONTINUATION frames")
        cont[2].extend(payload)
        if flags & END_HEADERS:
            self.continuation = None
            self._header_block(sid, cont[1], bytes(cont[2]))

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)  # always: keeps the dynamic table in sync
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client: must end the stream
            if call.remote_closed:
                self._reset(call, STREAM_CLOSED)
            elif not flags & END_STREAM:
                self._reset(call, PROTOCOL_ERROR)
            else:
                call.remote_closed = True
                self._pump(call)
            return
        if not sid & 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"even stream id {sid} from a client")
        if sid <= self.last_sid:
            raise ConnectionError_(PROTOCOL_ERROR, f"stream id {sid} not above the last one ({self.last_sid})")
        self.last_sid = sid
        if self.goaway_sid is not None:
            self.out.append(rst_stream(sid, REFUSED_STREAM))
            return
        if len(self.calls) >= self.limits.max_concurrent_streams:
            # RFC 9113 5.1.2: over the advertised limit; REFUSED_STREAM lets the client retry it
            self.out.append(rst_stream(sid, REFUSED_STREAM))
            return
        self._new_call(sid, flags, dict(headers))

    def _new_call(self, sid: int, flags: int, headers: dict[str, str]) -> None:
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith("application/grpc"):
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, _STATUS_415))
            if not flags & END_STREAM:
                self.out.append(rst_stream(sid, NO_ERROR))
            return
        if path != METHOD_PATH:
            self._trailers_only(sid, flags, UNIMPLEMENTED, f"unknown method {path}")
            return
        if self.handler.serving():
            call = Call(sid, self.handler.new_stream(), self.peer_window)
            call.st.on_evict = functools.partial(self._evict, call)  # type: ignore[union-attr]
        else:  # a follower: UNAVAILABLE, answered once the first message is in (as grpcio's abort in the
            # handler), so a grpc client sees that status rather than its in-flight write failing
            call = Call(sid, None, self.peer_window)
            call.reject = (UNAVAILABLE, NOT_LEADER_MESSAGE)
        self.calls[sid] = call
        if flags & END_STREAM:
            call.remote_closed = True
            self._pump(call)

    def _trailers_only(self, sid: int, flags: int, status: int, message: str) -> None:
        self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, _RESPONSE_HEADERS + _trailers(status, message)))
        if not flags & END_STREAM:
            self.out.append(rst_stream(sid, NO_ERROR))

    def _on_priority(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:  # a stream error (RFC 9113 6.3)
            self.out.append(rst_stream(sid, FRAME_SIZE_ERROR))
            call = self.calls.get(sid)
            if call is not None:
                self._cancel(call)

    def _on_rst_stream(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM size")
        call = self.calls.get(sid)
        if call is not None:
            self._cancel(call)  # = a grpcio cancellation
        elif self._idle_stream(sid):
            raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS size")
        for i in range(0, len(payload), 6):
            key, value = SETTING.unpack_from(payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_window
                self.peer_window = value
                for call in self.calls.values():
                    call.send_window += delta
                    if call.send_window > MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    raise ConnectionError_(PROTOCOL_ERROR, f"bad SETTINGS_MAX_FRAME_SIZE {value}")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise ConnectionError_(PROTOCOL_ERROR, "bad SETTINGS_ENABLE_PUSH")
            # HEADER_TABLE_SIZE: our encoder never indexes, so any size is fine.
        self.out.append(SETTINGS_ACK)
        if self.blocked:
            self._flush_blocked()

    def _on_push_promise(self, flags: int, sid: int, payload: bytes) -> None:
        raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionError_(FRAME_SIZE_ERROR, "PING size")
        if not flags & ACK:
            self.out.append(frame(PING, ACK, 0, payload))
        elif payload == SHUTDOWN_PING and self.draining and self.goaway_sid is None:
            self._final_goaway()

    def _on_goaway(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
        self.peer_goaway = True  # the client opens no new streams; current ones finish
        if not self.calls:
            self._close_when_idle()

    def _on_window_update(self, flags: int, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE size")
        inc = U32.unpack(payload)[0] & MAX_WINDOW
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            if self.blocked:
                self._flush_blocked()
            return
        call = self.calls.get(sid)
        if call is None:
            if self._idle_stream(sid):
                raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return  # a closed stream: a late update is allowed (RFC 9113 6.9)
        if inc == 0:
            self._reset(call, PROTOCOL_ERROR)
            return
        call.send_window += inc
        if call.send_window > MAX_WINDOW:
            self._reset(call, FLOW_CONTROL_ERROR)
            return
        if call.outq:
            self._flush(call)

    _handlers = (_on_data, _on_headers, _on_priority, _on_rst_stream, _on_settings, _on_push_promise, _on_ping,
                 _on_goaway, _on_window_update, _on_continuation)

    # ------------------------------------------------------------------ gRPC messages
    def _pump(self, call: Call) -> None:
        """Run every complete message through the state machine, in order; stop while a
        handler waits (admission) and resume when it is done."""
        buf = call.inbuf
        if call.reject is not None:
            if buf or call.remote_closed:
                self._finish(call, *call.reject)
            return
        pos = 0
        avail = len(buf)
        while call.task is None and not call.closed and avail - pos >= 5:
            compressed = buf[pos]
            length = U32.unpack_from(buf, pos + 1)[0]
            if compressed:
                self._finish(call, UNIMPLEMENTED, "compressed messages are not supported")
                break
            if length > self.server.max_message:
                self._finish(call, RESOURCE_EXHAUSTED,
                             f"received message larger than max ({length} vs. {self.server.max_message})")
                break
            end = pos + 5 + length
            if end > avail:
                break
            data = bytes(buf[pos + 5:end])
            pos = end
            try:
                msg = ProcessingRequest.FromString(data)
            except DecodeError:
                self._finish(call, INTERNAL, "cannot parse the request message")
                break
            self._handle(call, msg)
        if pos:
            del buf[:pos]
        if call.closed or call.task is not None:
            return
        if call.remote_closed:  # the client half-closed: the RPC ends as on grpcio's EOF
            if buf:
                self._finish(call, INTERNAL, "incomplete message at end of stream")
            else:
                self._finish(call, OK, "")
        elif call.credit >= STREAM_WINDOW // 2:
            self.out.append(frame(WINDOW_UPDATE, 0, call.sid, U32.pack(call.credit)))
            call.recv_window += call.credit
            call.credit = 0

    def _handle(self, call: Call, msg: ProcessingRequest) -> None:
        try:
            r = call.st.handle(msg)  # type: ignore[union-attr]
            if r is None:
                return
            if r.__class__ is not list:
                coro = r
                try:
                    waiting = coro.send(None)  # type: ignore[union-attr]
                except StopIteration as stop:
                    r = stop.value
                else:  # it waits (admission queue): finish it in a task, then resume this stream
                    task = call.task = self.loop.create_task(drive(coro, waiting, call))  # type: ignore[arg-type]
                    task.add_done_callback(lambda t, c=call: self._resumed(c, t))
                    return
        except StreamProtocolError as e:
            log.warning("ext_proc stream ended: protocol error: %s", e)
            self._finish(call, INVALID_ARGUMENT, f"ext_proc protocol error: {e}")
            return
        except Exception:  # noqa: BLE001 - as grpcio: the call fails with UNKNOWN, the server lives on
            log.exception("ext_proc handler failed")
            self._finish(call, UNKNOWN, "unexpected error in the ext_proc handler")
            return
        self._reply(call, r)  # type: ignore[arg-type]

    def _resumed(self, call: Call, task: asyncio.Task) -> None:
        call.task = None
        if call.closed:  # cancelled (RST_STREAM, connection lost, shutdown) while waiting
            self._release(call)
            return
        try:
            replies = task.result()
        except BaseException:  # noqa: BLE001
            log.exception("ext_proc handler failed")
            self._finish(call, UNKNOWN, "unexpected error in the ext_proc handler")
        else:
            self._reply(call, replies)
            if not call.closed and call.st.evicted:  # type: ignore[union-attr] - evicted while this task ended
                self._reply(call, call.st.evict())  # type: ignore[union-attr]
            if not call.closed:
                self._pump(call)
        self._drain()

    def _evict(self, call: Call) -> None:
        """The evictor ended this request: the state machine's last replies, then OK. While
        a handler task still runs, _resumed sends them after its replies."""
        if call.closed or call.task is not None:
            return
        self._reply(call, call.st.evict())  # type: ignore[union-attr]
        self._drain()

    def _reply(self, call: Call, replies: Sequence[bytes]) -> None:
        limit = self.server.max_send_message
        if limit and replies and max(map(len, replies)) > limit:  # as grpc-go's MaxSendMsgSize
            self._finish(call, RESOURCE_EXHAUSTED, f"trying to send message larger than max "
                                                   f"({max(map(len, replies))} vs. {limit})")
            return
        if replies:
            if not call.headers_sent:
                call.headers_sent = True
                self.out.append(frame(HEADERS, END_HEADERS, call.sid, _RESPONSE_HEADERS))
            head = MESSAGE_HEAD.pack
            if len(replies) == 1:
                r = replies[0]
                call.outq.append(head(0, len(r)) + r)
            else:
                parts = []
                for r in replies:
                    parts.append(head(0, len(r)))
                    parts.append(r)
                call.outq.append(b"".join(parts))
            self._flush(call)
        if call.st.finished:  # type: ignore[union-attr] - the state machine is done: end the RPC with OK
            self._finish(call, OK, "")

    # ------------------------------------------------------------------ sending
    def _flush(self, call: Call) -> None:
        """Send queued DATA within the connection and stream send windows, then trailers."""
        out = self.out
        q = call.outq
        max_frame = self.peer_max_frame
        sid = call.sid
        while q:
            room = min(self.send_window, call.send_window)
            if room <= 0:
                self.blocked[sid] = call
                return
            data = q[0]
            n = len(data)
            # The frame header and the payload go out as separate pieces of one write
            # (_drain joins them once): no copy of the payload per frame.
            if n <= room and n <= max_frame:
                out.append(FRAME_HEAD.pack(n << 8 | DATA, 0, sid))
                out.append(data)
                q.pop(0)
            else:
                n = min(room, max_frame)
                view = data if isinstance(data, memoryview) else memoryview(data)
                out.append(FRAME_HEAD.pack(n << 8 | DATA, 0, sid))
                out.append(view[:n])
                q[0] = view[n:]
            self.send_window -= n
            call.send_window -= n
        self.blocked.pop(sid, None)
        if call.trailers is not None:
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, call.trailers))
            call.trailers = None
            if not call.remote_closed:  # as grpc servers do (RFC 9113 8.1): the client need not send more
                out.append(rst_stream(sid, NO_ERROR))
            self._forget(call)

    def _flush_blocked(self) -> None:
        for call in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._flush(call)

    def _finish(self, call: Call, status: int, message: str) -> None:
        """End the RPC with `status`: trailers go after any queued DATA."""
        if call.closed:
            return
        call.closed = True
        block = _TRAILERS_OK if status == OK else _trailers(status, message)
        if not call.headers_sent:
            call.headers_sent = True
            block = _RESPONSE_HEADERS + block  # trailers-only response
        call.trailers = block
        self._cancel_task_or_release(call)
        self._flush(call)

    def _reset(self, call: Call, code: int) -> None:
        """A stream error: RST_STREAM and cancel the call."""
        self.out.append(rst_stream(call.sid, code))
        self._cancel(call)

    def _cancel(self, call: Call) -> None:
        """The stream is gone (RST_STREAM, connection lost): the grpcio cancellation path."""
        call.closed = True
        call.outq.clear()
        call.trailers = None
        self._forget(call)
        self._cancel_task_or_release(call)

    def _cancel_task_or_release(self, call: Call) -> None:
        task = call.task
        if task is None:
            self._release(call)
        elif call.started:
            task.cancel()  # its done callback releases once the handler unwound
        # else: the task sees call.closed when it first runs and cancels the handler itself

    def _release(self, call: Call) -> None:
        if not call.released:
            call.released = True
            if call.st is None:
                return
            try:
                call.st.close()
            except Exception:  # noqa: BLE001
                log.exception("ext_proc stream close failed")

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.sid, None)
        self.blocked.pop(call.sid, None)
        if not self.calls and (self.goaway_sid is not None or self.peer_goaway):
            self._close_when_idle()

    # ------------------------------------------------------------------ shutdown
    def shutdown(self) -> None:
        """Graceful: GOAWAY(max id) + PING; the final GOAWAY names the last stream once the
        PING comes back (streams the client opened meanwhile are still served)."""
        if self.lost or self.draining:
            return
        if self.closing:  # failed and lingering: nothing left to finish
            self.abort()
            return
        self.draining = True
        if not self.preface:
            if self.transport is not None:
                self.transport.close()
            return
        self.out.append(goaway(MAX_WINDOW, NO_ERROR))
        self.out.append(frame(PING, 0, 0, SHUTDOWN_PING))
        self._drain()

    def _final_goaway(self) -> None:
        self.goaway_sid = self.last_sid
        self.out.append(goaway(self.last_sid, NO_ERROR))
        if not self.calls:
            self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self.transport is not None and not self.lost:
            self._drain()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


__all__ = ["H2Connection", "SHUTDOWN_PING"]
