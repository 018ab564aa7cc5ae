"""Host:port text, parsed and written one way everywhere: flags, the endpoints file,
subset hints, the testing-filter header, the CLI's --addr and Envoy bootstraps.

IPv6 is written bracketed with a port ("[fd00::1]:8000") and may be bare without one
("fd00::1"); hosts come back without brackets."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["bracket", "join_hostport", "parse_hostport", "parse_ip", "parse_port", "split_hostport",
           "split_list"]


def split_hostport(text: str) -> tuple[str, str]:
    """Lenient split, never raises: "h:p" -> ("h", "p"); "[v6]:p" -> ("v6", "p");
    "h", "[v6]" and bare "v6" -> (host, ""). The port text is not checked."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, ""  # no port, or a bare IPv6 address


def split_list(value: str | Iterable[str]) -> list[tuple[str, str]]:
    """A comma-separated string (or a list of entries) -> split_hostport of each
    non-empty entry."""
    items = value.split(",") if isinstance(value, str) else value
    return [split_hostport(item) for item in items if item.strip()]


def parse_ip(host: str, where: str, text: str | None = None) -> str:
    """An IP address (v4 or v6, no brackets) in its compressed form; ValueError naming
    `where` (and the whole `text` it came from) otherwise."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        raise ValueError(f"{where}: {host!r} in {text if text is not None else host!r} "
                         "is not an IP address") from None


def parse_port(port_text: str, where: str, text: str) -> int:
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{where}: port {port_text!r} in {text!r} is not an integer") from None
    if not 0 < port < 65536:
        raise ValueError(f"{where}: port {port} in {text!r} is out of range 1-65535")
    return port


def parse_hostport(text: str, where: str, *, ip: bool = True) -> tuple[str, int]:
    """Strict "host:port" or "[v6]:port" -> (host without brackets, port 1-65535).
    ip=True requires the host to be an IP address (returned compressed). Errors are
    ValueErrors that start with `where`."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{where}: {text!r} is not [ipv6]:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            what = "ip:port" if ip else "host:port"
            raise ValueError(f"{where}: {text!r} is not {what} (bracket IPv6 as [addr]:port)")
        if not host and not ip:
            raise ValueError(f"{where}: {text!r} has no host")
    return (parse_ip(host, where, text) if ip else host), parse_port(port_text, where, text)


def bracket(host: str) -> str:
    """A host as it is written before ":port": IPv6 bracketed."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def join_hostport(host: str, port: int | str) -> str:
    return f"{bracket(host)}:{port}"
