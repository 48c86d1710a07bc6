#!/usr/bin/python3
"""Writer and checker for tests/qcow2_crash_alloc.rs (kill -9 during
allocating writes, issue 13).

    /usr/bin/python3 crash_alloc_writer.py

One command per line on stdin:

  run URI LOG SEED SIZE CLUSTER LOW STOP
      Connects to URI and keeps DEPTH requests in flight: allocating writes,
      each to clusters nobody else writes (the disk is cut into slots of 8
      clusters and every write gets a slot of its own, half of them among
      the first LOW bytes, where the backing has data): parts of a cluster,
      whole clusters, several clusters from an unaligned start. A write's
      data is a function of SEED and its index. About a quarter carry FUA;
      now and then a FLUSH. Every request is appended to LOG before it is
      sent ("I write OFF LEN FUA" or "I flush", flushed to the OS), every
      successful reply after it arrives ("ack I"); replies come in any
      order. Prints "acked STOP" once STOP replies have come, and keeps
      going until the connection fails (the test kills the server), then
      prints "done SENT".
  verify URI LOG SEED SIZE CLUSTER BACKING
      Reads the disk at URI (a read-only server on the crashed image).
      BACKING is a raw file with the backing's content, or "-" for none
      (zeroes). For every write of LOG:
        - durable (acknowledged with FUA, or acknowledged before a FLUSH
          was sent whose reply came): its range reads back exactly;
        - any write: the rest of its clusters reads as the backing (or
          zeroes): copy-on-write never leaves other bytes there;
        - a write that is not durable reads, in each 512-byte piece,
          either as before or as written (reported, counted).
      Prints "FAIL ..." lines for what is wrong, then "ok ..." (counts) or
      "bad ...", then "end".
  quit
"""

import random
import sys

import nbd

DEPTH = 8
SLOT_CLUSTERS = 8


def data_for(seed, index, length):
    return random.Random(seed * 1000003 + index).randbytes(length)


def shape(rng, slot_off, cs):
    """(offset, length) of one write inside the slot at slot_off."""
    r = rng.random()
    if r < 0.3:  # part of one cluster
        c = rng.randrange(SLOT_CLUSTERS)
        u = rng.randrange(cs)
        if rng.random() < 0.5:
            u = u // 512 * 512
        n = rng.randint(1, cs - u)
        if rng.random() < 0.5 and n >= 512:
            n = n // 512 * 512
        return slot_off + c * cs + u, n
    if r < 0.55:  # whole clusters
        c = rng.randrange(SLOT_CLUSTERS)
        k = rng.randint(1, min(4, SLOT_CLUSTERS - c))
        return slot_off + c * cs, k * cs
    # several clusters from an unaligned start, ending anywhere
    c = rng.randrange(SLOT_CLUSTERS - 1)
    u = rng.randint(1, cs - 1)
    if rng.random() < 0.5:
        u = max(512, u // 512 * 512)
    end_max = (SLOT_CLUSTERS - c) * cs - u
    n = rng.randint(cs - u + 1, end_max)
    return slot_off + c * cs + u, n


def run(uri, log_path, seed, size, cs, low, stop):
    rng = random.Random(seed)
    slot = SLOT_CLUSTERS * cs
    nslots = size // slot
    low_slots = list(range(min(nslots, -(-low // slot))))
    high_slots = list(range(len(low_slots), nslots))
    rng.shuffle(low_slots)
    rng.shuffle(high_slots)
    h = nbd.NBD()
    h.connect_uri(uri)
    sent = 0
    acked = [0]
    with open(log_path, "w") as log:
        def acker(index):
            def done(err):
                if err.value == 0:
                    log.write(f"ack {index}\n")
                    log.flush()
                    acked[0] += 1
                    if acked[0] == stop:
                        print(f"acked {stop}", flush=True)
                return 1
            return done

        try:
            while True:
                while h.aio_in_flight() < DEPTH:
                    if rng.random() < 0.1:
                        log.write(f"{sent} flush\n")
                        log.flush()
                        h.aio_flush(completion=acker(sent))
                        sent += 1
                        continue
                    if low_slots and (rng.random() < 0.5 or not high_slots):
                        s = low_slots.pop()
                    elif high_slots:
                        s = high_slots.pop()
                    else:
                        raise RuntimeError("out of slots")
                    off, n = shape(rng, s * slot, cs)
                    fua = rng.random() < 0.25
                    log.write(f"{sent} write {off} {n} {int(fua)}\n")
                    log.flush()
                    buf = nbd.Buffer.from_bytearray(
                        bytearray(data_for(seed, sent, n)))
                    h.aio_pwrite(buf, off, completion=acker(sent),
                                 flags=nbd.CMD_FLAG_FUA if fua else 0)
                    sent += 1
                h.poll(-1)
        except nbd.Error:
            pass
        try:
            h.shutdown()
        except Exception:
            pass
    print(f"done {sent}", flush=True)


def parse(log_path):
    """The writes [(index, off, len, fua)] and the durable indexes."""
    writes = {}
    acked = set()
    flushes = {}  # flush index -> writes acknowledged before it was sent
    durable = set()
    with open(log_path) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if w[0] == "ack":
                i = int(w[1])
                acked.add(i)
                if i in writes and writes[i][3]:
                    durable.add(i)
                elif i in flushes:
                    durable |= flushes[i]
            elif len(w) == 5 and w[1] == "write":
                i = int(w[0])
                writes[i] = (i, int(w[2]), int(w[3]), w[4] == "1")
            elif len(w) == 2 and w[1] == "flush":
                flushes[int(w[0])] = {i for i in acked if i in writes}
    return writes, acked, durable


def verify(uri, log_path, seed, size, cs, backing):
    writes, acked, durable = parse(log_path)
    old_src = None if backing == "-" else open(backing, "rb")
    old_len = 0
    if old_src is not None:
        old_src.seek(0, 2)
        old_len = old_src.tell()

    def old(off, n):
        """The content before any write: the backing's, or zeroes."""
        if old_src is None or off >= old_len:
            return bytes(n)
        old_src.seek(off)
        b = old_src.read(min(n, old_len - off))
        return b + bytes(n - len(b))

    h = nbd.NBD()
    h.connect_uri(uri)
    fails = []
    counts = {"writes": len(writes), "acked": len(acked & set(writes)),
              "durable": len(durable), "landed": 0, "as_before": 0,
              "mixed": 0}
    for i, off, n, fua in sorted(writes.values()):
        c0 = off // cs * cs
        c1 = min(size, -(-(off + n) // cs) * cs)
        got = h.pread(c1 - c0, c0)
        before = old(c0, c1 - c0)
        new = data_for(seed, i, n)
        a, b = off - c0, off - c0 + n
        kind = "durable" if i in durable else (
            "acknowledged" if i in acked else "unacknowledged")
        # Copy-on-write: the rest of the clusters is as before.
        for lo, hi in ((0, a), (b, c1 - c0)):
            if got[lo:hi] != before[lo:hi]:
                k = next(k for k in range(lo, hi) if got[k] != before[k])
                fails.append(
                    "write %d (%s, %d+%d, fua %d): byte %d of its cluster(s), "
                    "outside the write, reads %s, not the backing's %s"
                    % (i, kind, off, n, fua, c0 + k, got[k:k + 16].hex(),
                       before[k:k + 16].hex()))
                break
        mine = got[a:b]
        if mine == new:
            counts["landed"] += 1
            continue
        if i in durable:
            k = next(k for k in range(n) if mine[k] != new[k])
            fails.append(
                "write %d (durable, %d+%d, fua %d): byte %d reads %s, "
                "written %s%s" % (
                    i, off, n, fua, off + k, mine[k:k + 16].hex(),
                    new[k:k + 16].hex(),
                    " (as before the write)" if mine == before[a:b] else ""))
            continue
        if mine == before[a:b]:
            counts["as_before"] += 1
            continue
        # Not durable: each 512-byte sector of the disk as before or as
        # written, nothing else.
        p = 0
        while p < n:
            q = min(n, (off + p) // 512 * 512 + 512 - off)
            if mine[p:q] != new[p:q] and mine[p:q] != before[a + p:a + q]:
                fails.append(
                    "write %d (%s, %d+%d): bytes %d+%d read neither as "
                    "before nor as written (%s)" % (
                        i, kind, off, n, off + p, q - p,
                        mine[p:p + 16].hex()))
                break
            p = q
        else:
            counts["mixed"] += 1
    h.shutdown()
    for f in fails[:20]:
        print("FAIL " + f, flush=True)
    summary = " ".join("%s=%d" % kv for kv in counts.items())
    print(("bad %d problems, " % len(fails) if fails else "ok ") + summary,
          flush=True)
    print("end", flush=True)


def main():
    print("ready", flush=True)
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        if w[0] == "quit":
            return
        if w[0] == "run":
            run(w[1], w[2], int(w[3]), int(w[4]), int(w[5]), int(w[6]),
                int(w[7]))
        elif w[0] == "verify":
            verify(w[1], w[2], int(w[3]), int(w[4]), int(w[5]), w[6])


if __name__ == "__main__":
    main()
