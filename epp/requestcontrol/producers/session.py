"""session-id-producer (the reference's requestcontrol/dataproducer/sessionid/producer.go):
reads the request's session id from one header (headerName, matched case-insensitively) or
one cookie (cookieName) and publishes it, trimmed, under SESSION_ID.of(<its name>); nothing
when absent or empty. Exactly one of the two must be set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from epp.framework import CycleState, Endpoint, InferenceRequest, PluginHandle
from epp.framework.datakeys import SESSION_ID
from epp.framework.plugins import ConfiguredPlugin


@dataclass(slots=True)
class SessionIdParams:
    headerName: str = ""
    cookieName: str = ""

    def validate(self) -> None:
        header, cookie = self.headerName.strip(), self.cookieName.strip()
        if not header and not cookie:
            raise ValueError("headerName: session-id-producer requires exactly one of headerName or cookieName")
        if header and cookie:
            raise ValueError("cookieName: session-id-producer requires exactly one of headerName or cookieName, "
                             "not both")


def cookie_value(header: str, name: str) -> str:
    """The value of cookie `name` in a Cookie header ("a=1; b=2"), or ""."""
    for pair in header.split(";"):
        k, sep, v = pair.strip().partition("=")
        if sep and k == name:
            return v
    return ""


class SessionIdProducer(ConfiguredPlugin[SessionIdParams]):
    type_name = "session-id-producer"
    Params = SessionIdParams

    def configure(self, p: SessionIdParams, handle: PluginHandle) -> None:
        self.key = SESSION_ID.of(self.name)
        self.header = p.headerName.strip().lower()
        self.cookie = p.cookieName.strip()

    def session_id(self, request: InferenceRequest) -> str:
        headers = request.headers
        if self.header:
            return headers.get(self.header, "").strip()
        return cookie_value(headers.get("cookie", ""), self.cookie).strip()

    # PrepareData
    def prepare_request_data(self, cycle: CycleState, request: InferenceRequest,
                             endpoints: Sequence[Endpoint]) -> None:
        sid = self.session_id(request)
        if sid:
            cycle.write(self.key, sid)
