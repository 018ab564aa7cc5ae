"""Errors that end a request with an ImmediateResponse (reference protocol.md)."""

from __future__ import annotations

HTTP_STATUS = {
    "BadRequest": 400,
    "NotFound": 404,
    "PayloadTooLarge": 413,
    "ResourceExhausted": 429,
    "ServiceUnavailable": 503,
    "Internal": 500,
}


class InferenceError(Exception):
    """A request-level failure. `code` is one of HTTP_STATUS's keys; the client sees
    `inference error: <code> - <message>` as text/plain with the mapped status."""

    def __init__(self, code: str, message: str) -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown inference error code {code!r}")
        super().__init__(f"{code} - {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    @property
    def body(self) -> bytes:
        return f"inference error: {self.code} - {self.message}".encode()


def bad_request(message: str) -> InferenceError:
    return InferenceError("BadRequest", message)


def resource_exhausted(message: str) -> InferenceError:
    return InferenceError("ResourceExhausted", message)


def service_unavailable(message: str) -> InferenceError:
    return InferenceError("ServiceUnavailable", message)
