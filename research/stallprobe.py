#!/usr/bin/env python3
"""Measure I/O stalls and errors on a block device while paths fail (issue 12 research).

One synchronous loop of O_DIRECT 4 KiB write-then-read-back over the first ``--span`` MiB of the
device; every block carries its sequence number, so a read that returns anything but what was
just written counts as corruption. Each operation's start and end (CLOCK_MONOTONIC) are kept;
the summary reports the longest operation (the failover stall as an application sees it), every
operation over ``--stall`` seconds, and every error with its errno.

    stallprobe.py DEVICE --seconds 30 --json OUT.json

Written for the experiments, not product code: it writes over the device's first blocks.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import time
from typing import Any

BLOCK = 4096


def _pattern(seq: int, offset: int) -> bytes:
    return struct.pack("<QQ", seq, offset) * (BLOCK // 16)


def probe(device: str, seconds: float, span: int, stall: float) -> dict[str, Any]:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)   # page-aligned, as O_DIRECT wants
    view = memoryview(buf)
    blocks = span // BLOCK
    start = time.monotonic()
    ops = 0
    errors: list[dict[str, Any]] = []
    corrupt: list[dict[str, Any]] = []
    stalls: list[dict[str, Any]] = []
    longest = (0.0, 0.0)
    seq = 0
    try:
        while time.monotonic() - start < seconds:
            seq += 1
            offset = (seq % blocks) * BLOCK
            data = _pattern(seq, offset)
            for op in ("write", "read"):
                t0 = time.monotonic()
                try:
                    if op == "write":
                        view[:] = data
                        os.pwritev(fd, [view], offset)
                    else:
                        view[:] = b"\0" * BLOCK
                        os.preadv(fd, [view], offset)
                except OSError as exc:
                    failed: OSError | None = exc
                else:
                    failed = None
                ops += 1
                took = time.monotonic() - t0
                # An operation that ends in an error counts too: the application waited.
                if took > longest[0]:
                    longest = (took, t0 - start)
                if took >= stall:
                    stalls.append({"t": round(t0 - start, 3), "took": round(took, 3), "op": op,
                                   **({"errno": failed.errno} if failed else {})})
                if failed is not None:
                    errors.append({"t": round(t0 - start, 3), "after": round(took, 3),
                                   "op": op, "errno": failed.errno, "error": failed.strerror})
                    continue
                if op == "read" and bytes(view) != data:
                    corrupt.append({"t": round(t0 - start, 3), "offset": offset})
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return {"device": device, "seconds": round(time.monotonic() - start, 3), "ops": ops,
            "longest_op": round(longest[0], 3), "longest_at": round(longest[1], 3),
            "stalls": stalls, "errors": errors, "corrupt": corrupt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("device")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--span", type=int, default=16, help="MiB of the device to use")
    parser.add_argument("--stall", type=float, default=0.5,
                        help="report operations taking at least this many seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args()
    result = probe(args.device, args.seconds, args.span << 20, args.stall)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(f"stallprobe {args.device}: {result['ops']} ops in {result['seconds']} s, longest "
          f"{result['longest_op']} s at t={result['longest_at']} s, {len(result['errors'])} "
          f"errors, {len(result['corrupt'])} corrupt reads, stalls: "
          + (", ".join(f"{s['op']}@{s['t']}:{s['took']}s" for s in result["stalls"]) or "none"))
    for e in result["errors"][:10]:
        print(f"  error: {e}")
    sys.exit(1 if result["corrupt"] else 0)


if __name__ == "__main__":
    main()
