#!/usr/bin/python3
"""NBD load for tests/graph_stress.rs check 5 ("replacement under load").

    /usr/bin/python3 graph_replace_load.py URI MODEL SEED

CONNS libnbd connections (one thread each) keep up to DEPTH commands in
flight: writes, reads, write-zeroes and flushes. Connection k owns the k-th
CONNS-th of the disk, so with no two commands in flight on the same block the
content of every block is known at all times: every read is checked against
it as it completes, and a failed command or a wrong byte is fatal (a message
on stderr, exit 1). Data is a seeded pattern that names its connection, block
and generation, so a mismatch says which write it came from.

Protocol on stdin/stdout, one line each:
  -> "ready"         once every connection has commands in flight
  -> "tick"          after every TICK completed commands (all connections)
  <- "stop"          (or EOF) from the test: stop issuing, wait for the
                     commands in flight, disconnect; then read the whole disk
                     through a fresh connection and compare it with the model,
                     write the model as a raw image to MODEL, and
  -> "done ops=N writes=W reads=R zeroes=Z flushes=F verified=BYTES"
"""

import os
import random
import struct
import sys
import threading

import nbd

CONNS = 4
DEPTH = 8
BLOCK = 16 * 1024
MAX_RUN = 4
TICK = 16
MAGIC = 0x7469_6465_6D61_726B  # "tidemark"

out_lock = threading.Lock()
stop = threading.Event()
failed = threading.Event()
completed = [0]


def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def fail(msg):
    """The first failure ends the process: nothing after it is trustworthy."""
    with out_lock:
        sys.stderr.write(f"FAIL: {msg}\n")
        sys.stderr.flush()
        failed.set()
        os._exit(1)


def block_data(seed, conn, block, gen):
    """Content of `block` (global index) after write generation `gen`;
    generation 0 is zeroes (never written, or zeroed)."""
    if gen == 0:
        return bytes(BLOCK)
    return struct.pack("<4Q", MAGIC ^ seed, conn, block, gen) * (BLOCK // 32)


def describe(data, seed):
    """What a wrong block holds: the write it came from, if any."""
    if data == bytes(len(data)):
        return "zeroes"
    m, conn, block, gen = struct.unpack_from("<4Q", data)
    if m != MAGIC ^ seed:
        return f"foreign bytes {bytes(data[:16]).hex()}..."
    if data != block_data(seed, conn, block, gen):
        return f"a mix, starting with data of conn {conn} block {block} gen {gen}"
    return f"data of conn {conn} block {block} gen {gen}"


def tick():
    with out_lock:
        completed[0] += 1
        if completed[0] % TICK == 0:
            sys.stdout.write("tick\n")
            sys.stdout.flush()


class Worker(threading.Thread):
    def __init__(self, uri, seed, conn, first, count):
        super().__init__(daemon=True)
        self.uri = uri
        self.seed = seed
        self.conn = conn
        self.first = first  # first global block index of this region
        self.count = count  # blocks in the region
        self.gen = [0] * count  # acknowledged generation of each block
        self.busy = [False] * count
        self.next_gen = 1
        self.rng = random.Random(seed * 1000 + conn)
        self.stats = {"writes": 0, "reads": 0, "zeroes": 0, "flushes": 0}
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.started = threading.Event()

    def pick(self):
        """A run of 1..MAX_RUN idle blocks of the region, or None."""
        for _ in range(8):
            n = self.rng.randint(1, MAX_RUN)
            i = self.rng.randrange(self.count - n + 1)
            if not any(self.busy[i:i + n]):
                return i, n
        return None

    def issue(self):
        h = self.h
        r = self.rng.random()
        if r < 0.04:
            def done_flush(err):
                if err.value != 0:
                    fail(f"conn {self.conn}: flush failed: errno {err.value}")
                self.stats["flushes"] += 1
                tick()
                return 1
            h.aio_flush(completion=done_flush)
            return True
        run = self.pick()
        if run is None:
            return False
        i, n = run
        off = (self.first + i) * BLOCK
        for k in range(i, i + n):
            self.busy[k] = True
        if r < 0.50:
            gen = self.next_gen
            self.next_gen += 1
            data = b"".join(block_data(self.seed, self.conn, self.first + k, gen)
                            for k in range(i, i + n))
            buf = nbd.Buffer.from_bytearray(data)

            def done_write(err, buf=buf):
                if err.value != 0:
                    fail(f"conn {self.conn}: write of blocks {self.first + i}+{n} "
                         f"(gen {gen}) failed: errno {err.value}")
                for k in range(i, i + n):
                    self.gen[k] = gen
                    self.busy[k] = False
                self.stats["writes"] += 1
                tick()
                return 1
            h.aio_pwrite(buf, off, completion=done_write)
        elif r < 0.60:
            def done_zero(err):
                if err.value != 0:
                    fail(f"conn {self.conn}: zero of blocks {self.first + i}+{n} "
                         f"failed: errno {err.value}")
                for k in range(i, i + n):
                    self.gen[k] = 0
                    self.busy[k] = False
                self.stats["zeroes"] += 1
                tick()
                return 1
            h.aio_zero(n * BLOCK, off, completion=done_zero)
        else:
            buf = nbd.Buffer(n * BLOCK)

            def done_read(err, buf=buf):
                if err.value != 0:
                    fail(f"conn {self.conn}: read of blocks {self.first + i}+{n} "
                         f"failed: errno {err.value}")
                got = buf.to_bytearray()
                for j, k in enumerate(range(i, i + n)):
                    b = self.first + k
                    want = block_data(self.seed, self.conn, b, self.gen[k])
                    have = bytes(got[j * BLOCK:(j + 1) * BLOCK])
                    if have != want:
                        fail(f"conn {self.conn}: block {b} read back "
                             f"{describe(have, self.seed)}, expected gen {self.gen[k]}")
                    self.busy[k] = False
                self.stats["reads"] += 1
                tick()
                return 1
            h.aio_pread(buf, off, completion=done_read)
        return True

    def run(self):
        h = self.h
        try:
            while not stop.is_set():
                while h.aio_in_flight() < DEPTH and not stop.is_set():
                    if not self.issue():
                        break
                self.started.set()
                if h.aio_in_flight() > 0:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            h.shutdown()
        except nbd.Error as e:
            fail(f"conn {self.conn}: {e}")


def verify(uri, seed, workers, size):
    """Reads the whole disk through a fresh connection; returns the bytes
    compared."""
    h = nbd.NBD()
    h.connect_uri(uri)
    if h.get_size() != size:
        fail(f"fresh connection: size {h.get_size()}, expected {size}")
    chunk = 1 << 20
    per_chunk = chunk // BLOCK
    total = 0
    for off in range(0, size, chunk):
        got = h.pread(chunk, off)
        first = off // BLOCK
        for j in range(per_chunk):
            b = first + j
            w = workers[b // workers[0].count]
            want = block_data(seed, w.conn, b, w.gen[b - w.first])
            have = got[j * BLOCK:(j + 1) * BLOCK]
            if have != want:
                fail(f"fresh connection: block {b} holds {describe(have, seed)}, "
                     f"expected gen {w.gen[b - w.first]} of conn {w.conn}")
        total += chunk
    h.shutdown()
    return total


def write_model(path, seed, workers, size):
    with open(path, "wb") as f:
        f.truncate(size)
        for w in workers:
            for k, gen in enumerate(w.gen):
                if gen:
                    b = w.first + k
                    f.seek(b * BLOCK)
                    f.write(block_data(seed, w.conn, b, gen))


def main():
    uri, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    probe = nbd.NBD()
    probe.connect_uri(uri)
    size = probe.get_size()
    probe.shutdown()
    if size % (CONNS * BLOCK) != 0:
        fail(f"size {size} is not a multiple of {CONNS * BLOCK}")
    per = size // BLOCK // CONNS
    workers = [Worker(uri, seed, c, c * per, per) for c in range(CONNS)]
    for w in workers:
        w.start()
    for w in workers:
        w.started.wait()
    say("ready")
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            break
    stop.set()
    for w in workers:
        w.join()
    ops = completed[0]
    stats = {k: sum(w.stats[k] for w in workers) for k in workers[0].stats}
    verified = verify(uri, seed, workers, size)
    write_model(model, seed, workers, size)
    say(f"done ops={ops} writes={stats['writes']} reads={stats['reads']} "
        f"zeroes={stats['zeroes']} flushes={stats['flushes']} "
        f"verified={verified}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
