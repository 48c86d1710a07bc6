#!/usr/bin/python3
"""Random I/O load over NBD with libnbd's async API.

Keeps QD requests of BS bytes in flight on one connection for SECS seconds,
at uniformly random BS-aligned offsets over the whole export (or its first
SPAN bytes), and prints one
JSON line: {"op": ..., "iops": ..., "ops": ..., "secs": ..., "qd": ..., "bs": ...}.

Used by benches/compare.sh when fio's nbd engine is unavailable (or when
BENCH_RANDIO=python). Needs Debian's python3-libnbd, so run it with
/usr/bin/python3, not a pyenv python.

    randio.py URI read|write [--secs 10] [--qd 16] [--bs 4096] [--seed 1] [--span BYTES]
"""

import argparse
import json
import random
import sys
import time

import nbd


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("uri")
    p.add_argument("op", choices=["read", "write"])
    p.add_argument("--secs", type=float, default=10.0)
    p.add_argument("--qd", type=int, default=16)
    p.add_argument("--bs", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--span", type=int, default=0,
                   help="offsets within the first SPAN bytes (0: the whole export)")
    a = p.parse_args()

    h = nbd.NBD()
    # as nbdcopy and nbdinfo: the URI may name files (tls-certificates=,
    # tls-psk-file=; benches/tls.sh)
    h.set_uri_allow_local_file(True)
    h.connect_uri(a.uri)
    size = h.get_size()
    if a.span:
        size = min(size, a.span)
    nblocks = size // a.bs
    if nblocks < 1:
        sys.exit("export smaller than one block")
    if a.op == "write" and h.is_read_only():
        sys.exit("export is read-only")

    rng = random.Random(a.seed)
    # One buffer per slot: a buffer must stay valid until its command completes.
    if a.op == "write":
        bufs = [nbd.Buffer.from_bytearray(bytearray(rng.randbytes(a.bs)))
                for _ in range(a.qd)]
        issue = h.aio_pwrite
    else:
        bufs = [nbd.Buffer(a.bs) for _ in range(a.qd)]
        issue = h.aio_pread

    inflight = {}  # cookie -> slot

    def submit(slot):
        off = rng.randrange(nblocks) * a.bs
        inflight[issue(bufs[slot], off)] = slot

    ops = 0
    start = time.monotonic()
    deadline = start + a.secs
    for slot in range(a.qd):
        submit(slot)
    while inflight:
        h.poll(-1)
        now = time.monotonic()
        while inflight:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                break
            h.aio_command_completed(cookie)  # raises nbd.Error on I/O error
            slot = inflight.pop(cookie)
            ops += 1
            if now < deadline:
                submit(slot)
    elapsed = time.monotonic() - start
    h.shutdown()

    print(json.dumps({"op": a.op, "iops": ops / elapsed, "ops": ops,
                      "secs": round(elapsed, 3), "qd": a.qd, "bs": a.bs}))


if __name__ == "__main__":
    main()
