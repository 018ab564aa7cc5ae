"""Errors that end a request with an ImmediateResponse (reference protocol.md and
pkg/common/error/error.go)."""

from __future__ import annotations

HTTP_STATUS = {
    "BadRequest": 400,
    "NotFound": 404,
    "PayloadTooLarge": 413,
    "ResourceExhausted": 429,
    "ServiceUnavailable": 503,
    "Internal": 500,
}

# Response header naming why the picker dropped a request, and its values (the reference's).
DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"
REJECTED_SATURATED = "rejected-saturated"
REJECTED_NO_ENDPOINTS = "rejected-no-endpoints"
REJECTED_TTL_EXPIRED = "rejected-ttl-expired"
REJECTED_CONTEXT_CANCELLED = "rejected-context-cancelled"
REJECTED_SHUTTING_DOWN = "rejected-shutting-down"
EVICTED = "evicted"
EVICTED_QUEUE_PRESSURE = "evicted-queue-pressure"
EVICTED_PRIORITY = "evicted-priority"
DROPPED_REASONS = frozenset({REJECTED_SATURATED, REJECTED_NO_ENDPOINTS, REJECTED_TTL_EXPIRED,
                             REJECTED_CONTEXT_CANCELLED, REJECTED_SHUTTING_DOWN, EVICTED,
                             EVICTED_QUEUE_PRESSURE, EVICTED_PRIORITY})


class InferenceError(Exception):
    """A request-level failure. `code` is one of HTTP_STATUS's keys; the client sees
    `inference error: <code> - <message>` as text/plain with the mapped status. `reason`
    (one of DROPPED_REASONS) marks a request dropped by admission or scheduling; it is
    sent as the x-llm-d-request-dropped-reason response header."""

    def __init__(self, code: str, message: str, reason: str = "") -> None:
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown inference error code {code!r}")
        if reason and reason not in DROPPED_REASONS:
            raise ValueError(f"unknown dropped reason {reason!r}")
        super().__init__(f"{code} - {message}")
        self.code = code
        self.message = message
        self.reason = reason

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    @property
    def body(self) -> bytes:
        return f"inference error: {self.code} - {self.message}".encode()

    @property
    def headers(self) -> dict[str, str]:
        """Response headers the ImmediateResponse carries besides content-type."""
        return {DROPPED_REASON_HEADER: self.reason} if self.reason else {}


def bad_request(message: str) -> InferenceError:
    return InferenceError("BadRequest", message)


def resource_exhausted(message: str, reason: str = "") -> InferenceError:
    return InferenceError("ResourceExhausted", message, reason)


def service_unavailable(message: str, reason: str = "") -> InferenceError:
    return InferenceError("ServiceUnavailable", message, reason)
