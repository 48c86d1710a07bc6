#!/usr/bin/python3
"""NBD writer for tests/bitmap_crash.rs (bitmaps that survive kill -9).

    /usr/bin/python3 crash_writer.py

One command per line on stdin:

  run URI LOG SEED SIZE STOPS...
      Connects to URI and keeps DEPTH requests in flight: 4 KiB-aligned
      writes, write-zeroes and trims of 4 KiB to 256 KiB at seeded random
      offsets of a SIZE-byte disk. Every request is appended to LOG
      ("INDEX OP OFFSET LENGTH", flushed to the OS) BEFORE it is sent, so
      the log holds every request the daemon may have seen, acknowledged
      or not; each acknowledgement adds "ack INDEX". Every 4 KiB block a
      write sends starts with the 8-byte stamp INDEX + 1 (big-endian).
      Prints "at N" when request N has been sent, for each N in STOPS
      (ascending), and keeps going until the connection fails (the test
      kills the daemon), then prints "done SENT".
  seen URI LOG
      For every write in LOG without an acknowledgement: whether its data
      reached the disk (a block of its range carries its stamp). Prints
      "seen I J ..." (the indexes) and then "end".
  quit
"""

import random
import struct
import sys

import nbd

DEPTH = 8


def stamped(index, length):
    block = struct.pack(">Q", index + 1) + bytes(4088)
    return bytearray(block * (length // 4096))


def acker(log, index):
    def done(err):
        if err.value == 0:
            log.write(f"ack {index}\n")
            log.flush()
        return 1
    return done


def seen(uri, log_path):
    acked = set()
    writes = []
    with open(log_path) as f:
        for line in f:
            w = line.split()
            if w[0] == "ack":
                acked.add(int(w[1]))
            elif len(w) == 4 and w[1] == "write":
                writes.append((int(w[0]), int(w[2]), int(w[3])))
    h = nbd.NBD()
    h.connect_uri(uri)
    found = []
    for i, off, length in writes:
        if i in acked:
            continue
        data = h.pread(length, off)
        tag = struct.pack(">Q", i + 1)
        if any(data[b:b + 8] == tag for b in range(0, length, 4096)):
            found.append(str(i))
    h.shutdown()
    print("seen " + " ".join(found), flush=True)
    print("end", flush=True)


def run(uri, log_path, seed, size, stops):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    sent = 0
    stops = sorted(stops)
    with open(log_path, "w") as log:
        try:
            while True:
                while h.aio_in_flight() < DEPTH:
                    length = 4096 * rng.randint(1, 64)
                    off = 4096 * rng.randrange((size - length) // 4096 + 1)
                    r = rng.random()
                    op = "write" if r < 0.8 else ("zero" if r < 0.9 else "trim")
                    log.write(f"{sent} {op} {off} {length}\n")
                    log.flush()
                    done = acker(log, sent)
                    if op == "write":
                        buf = nbd.Buffer.from_bytearray(stamped(sent, length))
                        h.aio_pwrite(buf, off, completion=done)
                    elif op == "zero":
                        h.aio_zero(length, off, completion=done)
                    else:
                        h.aio_trim(length, off, completion=done)
                    sent += 1
                    while stops and sent >= stops[0]:
                        print(f"at {stops.pop(0)}", flush=True)
                h.poll(-1)
                # Completions are reaped so failures surface.
                while True:
                    c = h.aio_peek_command_completed()
                    if c == 0:
                        break
                    h.aio_command_completed(c)
        except Exception:
            pass
    try:
        h.shutdown()
    except Exception:
        pass
    print(f"done {sent}", flush=True)


def main():
    print("ready", flush=True)
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        if w[0] == "quit":
            return
        if w[0] == "run":
            run(w[1], w[2], int(w[3]), int(w[4]), [int(x) for x in w[5:]])
        elif w[0] == "seen":
            seen(w[1], w[2])


if __name__ == "__main__":
    main()
