"""HTTP/2 wire names (RFC 9113) and the native transport's bounds, each named once."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from urllib.parse import quote

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
# error codes (RFC 9113 7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
# gRPC status codes
OK, UNKNOWN, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 2, 3, 8, 12, 13, 14

MAX_WINDOW = 0x7FFFFFFF
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384

# Bounds of the native transport.
MAX_MESSAGE_SLACK = 1 << 20  # a BUFFERED body arrives as one message: the body limit plus its headers
STREAM_WINDOW = 16 * 1024 * 1024  # our SETTINGS_INITIAL_WINDOW_SIZE
CONNECTION_WINDOW = 1 << 30
OUR_MAX_FRAME = 1 << 20  # fewer frames (and Python iterations) for large bodies
MAX_HEADER_BLOCK = 256 * 1024  # bytes of one header block (HEADERS + CONTINUATION), before decoding
MAX_HEADER_FRAMES = 64  # CONTINUATION frames of one header block (empty ones cost nothing in bytes)
MAX_CONCURRENT_STREAMS = 1024  # per connection (SETTINGS_MAX_CONCURRENT_STREAMS); Envoy opens another
WRITE_HIGH_WATER = 1 << 20  # stop reading while more than this waits in the socket's write buffer
WRITE_LOW_WATER = 256 * 1024  # ... and read again below this
HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to the client's preface and SETTINGS
IDLE_TIMEOUT = 300.0  # a connection without streams for this long (up to twice) gets a graceful GOAWAY
CLOSE_LINGER = 2.0  # seconds a failed connection drains the peer's bytes after GOAWAY before it is aborted
GOAWAY_DEBUG_MAX = 256  # bytes of debug text in a GOAWAY


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The bounds above that one server applies to each of its connections (tests narrow them)."""

    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    max_header_block: int = MAX_HEADER_BLOCK
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    write_high_water: int = WRITE_HIGH_WATER
    write_low_water: int = WRITE_LOW_WATER

U32 = struct.Struct(">I")
SETTING = struct.Struct(">HI")
FRAME_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: the 9-byte frame header
MESSAGE_HEAD = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return FRAME_HEAD.pack(len(payload) << 8 | ftype, flags, sid) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in settings.items()))


def goaway(last_sid: int, code: int, debug: str = "") -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_sid) + U32.pack(code) + debug.encode()[:GOAWAY_DEBUG_MAX])


def rst_stream(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, U32.pack(code))


def grpc_message(text: str) -> str:
    """grpc-message is percent-encoded (gRPC over HTTP/2 spec); kept short."""
    return quote(text[:1024], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


SETTINGS_ACK = frame(SETTINGS, ACK, 0)
CONNECTION_WINDOW_UPDATE = frame(WINDOW_UPDATE, 0, 0, U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))


class ConnectionError_(Exception):  # noqa: N801 - not the builtin ConnectionError
    """An HTTP/2 connection error: GOAWAY with `code`, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
