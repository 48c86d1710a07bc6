#!/usr/bin/python3
"""NBD writer for tests/backup_point_in_time.rs ("point in time under load").

    /usr/bin/python3 backup_writer.py URI SEED

CONNS libnbd connections (one thread each) keep up to DEPTH commands in
flight over the whole disk, at seeded pseudo-random 512-byte-aligned offsets:
writes of 512 B to 256 KiB (most of them crossing 64 KiB cluster boundaries),
some write-zeroes, a few flushes. Regions overlap freely, across connections
too: nobody checks what the source holds afterwards, only that the backup
target does not see any of it.

Every sector a write puts down is stamped with WRITE_MAGIC ^ SEED, its own
offset, the write's generation and connection, so the test can say where a
wrong sector of the target came from.

Protocol:
  <- "stop MICROS"  (one line on stdin; MICROS is a CLOCK_REALTIME time in
                    microseconds, the BLOCK_JOB_COMPLETED event's timestamp)
                    or EOF: stop issuing, wait for the commands in flight,
                    disconnect, then
  -> one line of JSON on stdout:
       {"writes": W, "zeroes": Z, "flushes": F, "bytes": B,
        "errors": E, "messages": [first few errors],
        "before": {"writes": W0, "zeroes": Z0},
        "first_us": T, "last_us": T}
     where "before" counts the commands whose reply the client had received
     before MICROS (so the server sent it before the event). A failed command
     is recorded and ends its connection's load; the report still comes.
     Exit status 0 whenever the report was written.
"""

import json
import random
import struct
import sys
import threading
import time

import nbd

CONNS = 2
DEPTH = 4
SECTOR = 512
MAX_SECTORS = 512  # 256 KiB
WRITE_MAGIC = 0x7772_6974_6572_2121  # "writer!!"
MAX_MESSAGES = 5

stop = threading.Event()
lock = threading.Lock()
messages = []


def now_us():
    return time.time_ns() // 1000


def sector_stamp(seed, off, gen, conn):
    """One sector of generation `gen`'s data at byte offset `off`."""
    return struct.pack("<4Q", WRITE_MAGIC ^ seed, off, gen, conn) * (SECTOR // 32)


def record_error(msg):
    with lock:
        if len(messages) < MAX_MESSAGES:
            messages.append(msg)


class Worker(threading.Thread):
    def __init__(self, uri, seed, conn):
        super().__init__(daemon=True)
        self.seed = seed
        self.conn = conn
        self.rng = random.Random(seed * 1009 + conn)
        self.gen = 0
        self.errors = 0
        self.failed = False
        self.stats = {"writes": 0, "zeroes": 0, "flushes": 0, "bytes": 0}
        # Completion times (µs) of successful writes and write-zeroes.
        self.write_times = []
        self.zero_times = []
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = self.h.get_size()

    def fail(self, what, err):
        self.errors += 1
        self.failed = True
        record_error(f"conn {self.conn}: {what} failed: errno {err}")

    def issue(self):
        h = self.h
        r = self.rng.random()
        if r < 0.03:
            def done_flush(err):
                if err.value != 0:
                    self.fail("flush", err.value)
                else:
                    self.stats["flushes"] += 1
                return 1
            h.aio_flush(completion=done_flush)
            return
        n = self.rng.randint(1, MAX_SECTORS)
        off = self.rng.randrange(self.size // SECTOR - n + 1) * SECTOR
        length = n * SECTOR
        if r < 0.13:
            def done_zero(err):
                if err.value != 0:
                    self.fail(f"write-zeroes {off}+{length}", err.value)
                else:
                    self.zero_times.append(now_us())
                    self.stats["zeroes"] += 1
                    self.stats["bytes"] += length
                return 1
            h.aio_zero(length, off, completion=done_zero)
            return
        self.gen += 1
        gen = self.gen
        data = b"".join(sector_stamp(self.seed, off + k * SECTOR, gen, self.conn)
                        for k in range(n))
        buf = nbd.Buffer.from_bytearray(data)

        def done_write(err, buf=buf):
            if err.value != 0:
                self.fail(f"write {off}+{length} (gen {gen})", err.value)
            else:
                self.write_times.append(now_us())
                self.stats["writes"] += 1
                self.stats["bytes"] += length
            return 1
        h.aio_pwrite(buf, off, completion=done_write)

    def run(self):
        h = self.h
        try:
            while not stop.is_set() and not self.failed:
                while h.aio_in_flight() < DEPTH and not stop.is_set() \
                        and not self.failed:
                    self.issue()
                if h.aio_in_flight() > 0:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            h.shutdown()
        except Exception as e:  # nbd.Error, or a bug here: report it
            self.errors += 1
            self.failed = True
            record_error(f"conn {self.conn}: {e}")


def main():
    uri, seed = sys.argv[1], int(sys.argv[2])
    workers = [Worker(uri, seed, c) for c in range(CONNS)]
    for w in workers:
        w.start()
    line = sys.stdin.readline().split()
    # EOF (the test gave up): everything counts as "after".
    limit = int(line[1]) if len(line) == 2 and line[0] == "stop" else 0
    stop.set()
    for w in workers:
        w.join()
    times = sorted(t for w in workers for t in w.write_times + w.zero_times)
    report = {k: sum(w.stats[k] for w in workers) for k in workers[0].stats}
    report["errors"] = sum(w.errors for w in workers)
    report["messages"] = messages
    report["before"] = {
        "writes": sum(1 for w in workers for t in w.write_times if t < limit),
        "zeroes": sum(1 for w in workers for t in w.zero_times if t < limit),
    }
    report["first_us"] = times[0] if times else None
    report["last_us"] = times[-1] if times else None
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
