"""CPU cost of decoding one large header value with the native transport's HPACK decoder.

    .venv/bin/python -m bench.hpack_cost [--sizes-kb 1,16,256] [--rounds 5]

For each size, one header block holding a single literal field whose value is that many KB,
Huffman-coded (ASCII text, and arbitrary octets: the longest codes) and plain, decoded by a
fresh epp.handlers.h2.hpack.Decoder. Prints the best-of-rounds CPU time per decode and per KB
of value; linear decoding shows as a flat time/KB column. If the `hpack` library is installed
(dev extra), its decoder is timed on the same blocks for reference.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from epp.handlers.h2.hpack import Decoder, huffman_encode

_TEXT = b"abcdefghijklmnopqrstuvwxyz0123456789-_./=;"


def _integer(value: int, prefix: int, first: int) -> bytes:
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((first | value,))
    out, value = bytearray((first | mask,)), value - mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out) + bytes((value,))


def block(value: bytes, huffman: bool) -> bytes:
    """A literal field without indexing, new name "x-big", the value as given."""
    data = huffman_encode(value) if huffman else value
    return b"\x00\x05x-big" + _integer(len(data), 7, 0x80 if huffman else 0) + data


def best_cpu(decode: Callable[[bytes], object], blk: bytes, rounds: int) -> float:
    """Best CPU seconds of `rounds` runs, each enough repetitions to last ~20 ms."""
    t = time.process_time()
    decode(blk)
    reps = max(1, int(0.02 / max(time.process_time() - t, 1e-6)))
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(reps):
            decode(blk)
        best = min(best, (time.process_time() - t) / reps)
    return best


def _ours(blk: bytes) -> object:
    return Decoder(max_header_list_size=1 << 20).decode(blk)


def _reference() -> Callable[[bytes], object] | None:
    try:
        import hpack
    except ImportError:
        return None

    def decode(blk: bytes) -> object:
        return hpack.Decoder(max_header_list_size=1 << 20).decode(blk, raw=True)
    return decode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-kb", default="1,16,256")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes_kb.split(",")]
    rng = random.Random(1)
    reference = _reference()
    print(f"{'value':>6} {'encoding':<16} {'block KB':>9} {'ms/decode':>10} {'us/KB':>8}"
          + (f" {'hpack us/KB':>12}" if reference else ""))
    for kind, huffman in (("huffman text", True), ("huffman octets", True), ("plain", False)):
        per_kb: list[float] = []
        for kb in sizes:
            n = kb * 1024
            value = rng.randbytes(n) if kind == "huffman octets" else bytes(rng.choices(_TEXT, k=n))
            blk = block(value, huffman)
            assert _ours(blk) == [("x-big", value.decode("latin-1"))]
            cpu = best_cpu(_ours, blk, args.rounds)
            per_kb.append(cpu / kb * 1e6)
            line = f"{kb:>4}KB {kind:<16} {len(blk) / 1024:>9.1f} {cpu * 1e3:>10.3f} {per_kb[-1]:>8.1f}"
            if reference:
                line += f" {best_cpu(reference, blk, args.rounds) / kb * 1e6:>12.1f}"
            print(line)
        print(f"       {kind}: time/KB at {sizes[-1]} KB is {per_kb[-1] / per_kb[0]:.2f}x that at {sizes[0]} KB")


if __name__ == "__main__":
    main()
