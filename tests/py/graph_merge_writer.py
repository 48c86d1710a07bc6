#!/usr/bin/python3
"""NBD load for tests/graph_stress.rs check 6 ("no deadlock").

    /usr/bin/python3 graph_merge_writer.py URI

One libnbd connection keeps up to DEPTH commands in flight: 64 KiB writes at
seeded pseudo-random offsets over the whole disk, interleaved with whole-disk
trim passes (the disk in 1 GiB trims), while the test merges bitmaps over QMP.

Protocol on stdin/stdout, one line each:
  -> "ready"                  once connected and the first commands are out
  <- "begin"                  from the test as its merges start
  <- "report"                 from the test once its merges are done
  -> "ok writes=W trims=T during=D"
                              after at least one whole-disk trim pass and
                              MIN_WRITES writes were acknowledged, D of the
                              writes between "begin" and "report"; from then on
                              the writer keeps going, and a failed command or
                              a closed connection (the daemon quitting) ends
                              it quietly with exit 0
Before "report", any failed command is fatal: a message on stderr, exit 1.
EOF on stdin also ends the writer (exit 0 once tolerant, else 1).
"""

import os
import random
import select
import sys

import nbd

DEPTH = 8
WRITE_LEN = 64 * 1024
TRIM_LEN = 1 << 30
MIN_WRITES = 64


def main():
    uri = sys.argv[1]
    rng = random.Random(0x7D1DE)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    slots = size // WRITE_LEN
    payloads = [nbd.Buffer.from_bytearray(bytes([i + 1]) * WRITE_LEN)
                for i in range(4)]

    state = {
        "writes": 0,
        "passes": 0,
        "trim_acked": 0,
        "failed": None,
    }
    tolerant = False
    # Trim chunks of the pass in progress: next one to issue.
    trim_next = 0
    chunks = (size + TRIM_LEN - 1) // TRIM_LEN

    def on_write(err):
        if err.value != 0:
            state["failed"] = state["failed"] or f"write failed: errno {err.value}"
        else:
            state["writes"] += 1
        return 1

    def on_trim(err):
        if err.value != 0:
            state["failed"] = state["failed"] or f"trim failed: errno {err.value}"
        else:
            state["trim_acked"] += 1
            if state["trim_acked"] == chunks:
                state["trim_acked"] = 0
                state["passes"] += 1
        return 1

    def issue(i):
        nonlocal trim_next
        if i % 3 == 2:
            off = trim_next * TRIM_LEN
            h.aio_trim(min(TRIM_LEN, size - off), off, completion=on_trim)
            trim_next = (trim_next + 1) % chunks
        else:
            off = rng.randrange(slots) * WRITE_LEN
            h.aio_pwrite(payloads[i % 4], off, completion=on_write)

    stdin = sys.stdin.fileno()
    issued = 0
    reported = False
    report_asked = False
    at_begin = None
    during = None
    announced = False
    try:
        while True:
            while h.aio_in_flight() < DEPTH:
                issue(issued)
                issued += 1
            if not announced:
                print("ready", flush=True)
                announced = True
            if state["failed"] and not tolerant:
                print(state["failed"], file=sys.stderr, flush=True)
                return 1
            if state["failed"]:
                return 0
            if report_asked and not reported and state["passes"] >= 1 \
                    and state["writes"] >= MIN_WRITES:
                print(f"ok writes={state['writes']} trims={state['passes']} "
                      f"during={during}", flush=True)
                reported = True
                tolerant = True
            r, _, _ = select.select([stdin], [], [], 0)
            if r:
                line = os.read(stdin, 4096)
                if not line:
                    if not tolerant:
                        print("stdin closed before the report",
                              file=sys.stderr, flush=True)
                    return 0 if tolerant else 1
                if b"begin" in line:
                    at_begin = state["writes"]
                if b"report" in line and at_begin is not None:
                    report_asked = True
                    during = state["writes"] - at_begin
            h.poll(-1)
    except nbd.Error as e:
        if tolerant:
            return 0
        print(f"connection failed: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
