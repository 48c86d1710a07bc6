#!/usr/bin/python3
"""Pipelined reads and writes on several connections at once (libnbd aio,
one event loop over every handle), for the thread-count test.

usage: nbd_threads_load.py SOCKET CONNECTIONS REQUESTS_PER_CONNECTION DEPTH SEED

Each connection keeps DEPTH requests in flight until it has issued its
share: reads and writes, half each, of 4 KiB to 128 KiB at 4 KiB-aligned
random offsets. A write fills each 4 KiB block with a byte of its own; a
read checks that every byte it gets is that byte or the image's first
content there (0x5a in the first half, zeroes after): a read racing a write
of the same block may see some of each. Prints one JSON line: requests
done and the most that were in flight together.
"""

import json
import random
import select
import sys

import nbd

BLOCK = 4096


def mark(block):
    """The byte written all over 4 KiB block number `block`."""
    return block % 251 + 1


def pattern(offset, length):
    out = bytearray()
    for b in range(offset // BLOCK, (offset + length) // BLOCK):
        out += bytes([mark(b)]) * BLOCK
    return bytes(out)


def main():
    sock, conns, per_conn, depth, seed = sys.argv[1:6]
    conns, per_conn, depth = int(conns), int(per_conn), int(depth)
    rng = random.Random(int(seed))
    handles = []
    for _ in range(conns):
        h = nbd.NBD()
        h.connect_unix(sock)
        handles.append(h)
    size = handles[0].get_size()
    half = size // 2
    issued = [0] * conns
    done = [0]
    most = [0]
    errors = []

    def check_read(offset, buf):
        data = buf.to_bytearray()
        for i in range(0, len(data), BLOCK):
            at = offset + i
            first = 0x5a if at < half else 0
            if not set(data[i:i + BLOCK]) <= {first, mark(at // BLOCK)}:
                errors.append("bad data at %d" % at)
                return

    def submit(k):
        h = handles[k]
        length = rng.randrange(1, 33) * BLOCK
        offset = rng.randrange(0, (size - length) // BLOCK + 1) * BLOCK
        issued[k] += 1

        def done_cb(err, offset=offset, buf=None):
            # libnbd only prints what a callback raises: keep it.
            try:
                if err.value != 0:
                    errors.append("request at %d failed: %d" % (offset, err.value))
                elif buf is not None:
                    check_read(offset, buf)
                done[0] += 1
            except Exception as e:
                errors.append(repr(e))
            return 1

        if rng.random() < 0.5:
            buf = nbd.Buffer(length)
            h.aio_pread(buf, offset,
                        completion=lambda err, b=buf, o=offset: done_cb(err, o, b))
        else:
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(offset, length))),
                         offset, completion=lambda err, o=offset: done_cb(err, o))

    while True:
        for k, h in enumerate(handles):
            while issued[k] < per_conn and h.aio_in_flight() < depth:
                submit(k)
        flying = sum(h.aio_in_flight() for h in handles)
        most[0] = max(most[0], flying)
        if flying == 0 and all(n == per_conn for n in issued):
            break
        reads, writes = [], []
        for h in handles:
            d = h.aio_get_direction()
            if d & nbd.AIO_DIRECTION_READ:
                reads.append(h.aio_get_fd())
            if d & nbd.AIO_DIRECTION_WRITE:
                writes.append(h.aio_get_fd())
        r, w, _ = select.select(reads, writes, [], 30)
        if not r and not w:
            sys.exit("no progress for 30 s")
        for h in handles:
            fd = h.aio_get_fd()
            if fd in r:
                h.aio_notify_read()
            elif fd in w:
                h.aio_notify_write()
        if errors:
            sys.exit("; ".join(errors[:5]))
    for h in handles:
        h.flush()
        h.shutdown()
    print(json.dumps({"done": done[0], "most_in_flight": most[0]}))


if __name__ == "__main__":
    main()
