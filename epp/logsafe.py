"""Client strings made safe to log: a model name, header value or request id is printed
with control characters escaped (a newline cannot forge a log line) and cut to a bound."""

from __future__ import annotations

__all__ = ["MAX_LOGGED_CHARS", "clean"]

MAX_LOGGED_CHARS = 256  # longest client string a log line carries; the rest is counted, not printed


def _escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """`value` as one printable line: non-printable characters (newlines, ANSI escapes,
    line/paragraph separators) and backslashes escaped, at most `limit` characters kept."""
    text = value if isinstance(value, str) else str(value)
    extra = len(text) - limit
    if extra > 0:
        text = text[:limit]
    if not text.isprintable() or "\\" in text:
        text = "".join(map(_escape, text))
    return f"{text}...({extra} more chars)" if extra > 0 else text
