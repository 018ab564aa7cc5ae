"""Reading an HTTP peer's answer with a bound (aiohttp): `StreamReader.read(n)` returns
whatever has arrived so far, maybe a part of the body, so a bounded read loops over the
chunks until the end or the limit."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is longer than `limit` bytes."""
    parts, size = [], 0
    async for chunk in content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
