#!/usr/bin/python3
"""One connection of tests/qcow2_stress.rs (issue 13's stress test).

    /usr/bin/python3 qcow2_stress.py URI EXPECTED SIZE WINDOWS SEED CONN CONNS SECS

WINDOWS is "OFF:LEN,OFF:LEN,...": the parts of the disk the test works in.
They are cut into stripes of 256 KiB to ~1 MiB (boundaries 512-byte
aligned, mostly not cluster aligned, so neighbouring connections share
clusters, L2 tables and refcount blocks), the same cut for every
connection (it depends on SEED only); stripe K belongs to connection
K % CONNS. Connection CONN touches only its own stripes, one stripe per
request, so its model of them is exact whatever the other connections do.

EXPECTED is a raw file with the disk's content before the test (qemu-img
convert of the overlay, read through its backing): the model starts from
it, and at the end the model's stripes are written back into it, so the
test can `qemu-img compare` it with the overlay.

Protocol: prints "connected" once the handshake is done, waits for "go" on
stdin, then for SECS seconds keeps DEPTH requests in flight: reads (checked
against the model as they complete), writes (some with FUA), write-zeroes
(some NO_HOLE or FUA), trims and flushes of 1 byte to 1 MiB, aligned and
unaligned. No two requests in flight overlap. A trim makes its bytes
unknown (NBD leaves their content undefined): reads there are not
checked. Then: every unknown range is written, every stripe is read back
whole and compared, and the model goes to EXPECTED. Prints "done ..." and
exits 0, or prints "FAIL ..." (with the history of the bytes concerned)
and exits 1.
"""

import random
import sys
import time

import nbd

DEPTH = 8
CLUSTER = 65536
MAX_REQ = 1 << 20
# What one L2 table maps with 64 KiB clusters.
L2_SPAN = 512 << 20


def layout(windows, seed):
    """The stripes (offset, length) of all windows, in disk order."""
    rng = random.Random(seed)
    stripes = []
    for off, length in windows:
        end = off + length
        at = off
        while at < end:
            n = 512 * rng.randint(512, 2176)  # 256 KiB .. 1.0625 MiB
            if end - (at + n) < 65536:
                n = end - at
            stripes.append((at, n))
            at += n
    return stripes


class Intervals:
    """Disjoint half-open ranges [s, e), sorted."""

    def __init__(self):
        self.r = []

    def add(self, s, e):
        out = []
        for a, b in self.r:
            if b < s or a > e:
                out.append((a, b))
            else:
                s, e = min(a, s), max(b, e)
        out.append((s, e))
        out.sort()
        self.r = out

    def remove(self, s, e):
        out = []
        for a, b in self.r:
            if b <= s or a >= e:
                out.append((a, b))
                continue
            if a < s:
                out.append((a, s))
            if b > e:
                out.append((e, b))
        self.r = out

    def clip(self, s, e):
        return [(max(a, s), min(b, e)) for a, b in self.r if a < e and b > s]


class Stripe:
    def __init__(self, off, length, data):
        self.off = off
        self.len = length
        self.model = bytearray(data)
        self.initial = bytes(data)  # for failure reports
        self.unknown = Intervals()  # absolute offsets
        self.busy = []  # (s, e) absolute, requests in flight


class Conn:
    def __init__(self, args):
        (self.uri, self.expected, size, windows, seed, conn, conns,
         secs) = args
        self.size = int(size)
        self.windows = [tuple(int(x) for x in w.split(":"))
                        for w in windows.split(",")]
        self.seed = int(seed)
        self.conn = int(conn)
        self.conns = int(conns)
        self.secs = float(secs)
        self.rng = random.Random(self.seed * 1000003 + self.conn)
        all_stripes = layout(self.windows, self.seed)
        self.stripes = []
        with open(self.expected, "rb") as f:
            for k, (off, length) in enumerate(all_stripes):
                if k % self.conns == self.conn:
                    f.seek(off)
                    data = f.read(length)
                    assert len(data) == length, (off, length, len(data))
                    self.stripes.append(Stripe(off, length, data))
        self.history = []  # (index, op, off, len, extra)
        self.failures = []
        self.stats = {"read": 0, "write": 0, "zero": 0, "trim": 0,
                      "flush": 0, "fua": 0, "checked_bytes": 0,
                      "busy_waits": 0, "l2_crossings": 0}
        self.pending = None
        self.bad_reads = []
        self.h = nbd.NBD()
        self.h.connect_uri(self.uri)

    # -- failures ---------------------------------------------------------

    def fail(self, msg, at=None):
        if at is not None:
            touching = [x for x in self.history
                        if x[1] != "flush" and x[2] <= at < x[2] + x[3]]
            msg += "\n  history of byte %d on this connection (last 12): %s" % (
                at, touching[-12:])
        self.failures.append(msg)

    # -- requests ---------------------------------------------------------

    def pick_len(self, cap):
        r = self.rng.random()
        if r < 0.25:
            n = self.rng.randint(1, 8192)
        elif r < 0.45:
            n = CLUSTER * self.rng.randint(1, 4)
        elif r < 0.7:
            n = self.rng.randint(8192, 131072)
        else:
            n = self.rng.randint(131072, MAX_REQ)
        if self.rng.random() < 0.5:
            n = max(512, n // 512 * 512)
        return max(1, min(n, cap))

    def pick_range(self, st):
        n = self.pick_len(st.len)
        off = st.off + self.rng.randint(0, st.len - n)
        a = self.rng.random()
        if a < 0.3:
            aligned = off // CLUSTER * CLUSTER
            if aligned >= st.off:
                off = aligned
        elif a < 0.6:
            aligned = off // 512 * 512
            if aligned >= st.off:
                off = aligned
        return off, n

    def free(self, st, s, e):
        return all(e <= a or s >= b for a, b in st.busy)

    def next_request(self):
        """A seeded request: (op, stripe, offset, length, arg)."""
        r = self.rng.random()
        if r < 0.03:
            return ("flush", None, 0, 0, None)
        st = self.rng.choice(self.stripes)
        off, n = self.pick_range(st)
        if r < 0.38:
            return ("read", st, off, n, None)
        if r < 0.72:
            return ("write", st, off, n, self.rng.random() < 0.1)
        if r < 0.88:
            return ("zero", st, off, n, None)
        return ("trim", st, off, n, None)

    def submit_one(self):
        """Sends the next request; False if it overlaps one in flight (it
        stays next, and the caller waits for completions)."""
        if self.pending is None:
            self.pending = self.next_request()
        op, st, off, n, arg = self.pending
        if st is not None and not self.free(st, off, off + n):
            self.stats["busy_waits"] += 1
            return False
        self.pending = None
        if op == "flush":
            self.send_flush()
        elif op == "read":
            self.send_read(st, off, n)
        elif op == "write":
            self.send_write(st, off, n, arg)
        elif op == "zero":
            self.send_zero(st, off, n)
        else:
            self.send_trim(st, off, n)
        return True

    def completion(self, st, s, e, what, then=None):
        def done(err):
            # libnbd only prints what a callback raises: catch it all.
            try:
                if st is not None:
                    st.busy.remove((s, e))
                if err.value != 0:
                    self.fail("%s failed: errno %d" % (what, err.value), s)
                elif then is not None:
                    then()
            except Exception as exc:
                self.fail("%s: completion raised %r" % (what, exc), s)
            return 1
        return done

    def log(self, op, off, n, extra=""):
        idx = len(self.history)
        if n and off // L2_SPAN != (off + n - 1) // L2_SPAN:
            self.stats["l2_crossings"] += 1
        self.history.append((idx, op, off, n, extra))
        return "#%d %s %d+%d %s" % (idx, op, off, n, extra)

    def send_read(self, st, off, n):
        what = self.log("read", off, n)
        self.stats["read"] += 1
        buf = nbd.Buffer(n)
        st.busy.append((off, off + n))
        self.h.aio_pread(buf, off, completion=self.completion(
            st, off, off + n, what, lambda: self.check(st, off, buf, what)))

    def check(self, st, off, buf, what):
        got = buf.to_bytearray()
        n = len(got)
        pieces = []
        at = off
        for a, b in st.unknown.clip(off, off + n):
            if a > at:
                pieces.append((at, a))
            at = b
        if at < off + n:
            pieces.append((at, off + n))
        for a, b in pieces:
            want = st.model[a - st.off:b - st.off]
            have = got[a - off:b - off]
            self.stats["checked_bytes"] += b - a
            if want != have:
                i = next(k for k in range(b - a) if want[k] != have[k])
                bad = a + i
                self.fail(
                    "%s: byte %d (cluster %d, +%d in it) reads %s, model has %s"
                    % (what, bad, bad // CLUSTER, bad % CLUSTER,
                       bytes(have[i:i + 16]).hex(),
                       bytes(want[i:i + 16]).hex()) + self.explain(
                           st, off, got, bad), bad)
                self.bad_reads.append((st, off, n))
                return

    def explain(self, st, off, got, bad):
        """Where the wrong bytes may come from, for the report."""
        rel = bad - st.off
        init = st.initial[rel:rel + 16]
        wrong = [k for k in range(len(got))
                 if got[k] != st.model[off - st.off + k]]
        return ("\n  %d wrong bytes in the read, from %d to %d; the bytes at %d "
                "%s the disk's content before the test (%s)" % (
                    len(wrong), off + wrong[0], off + wrong[-1], bad,
                    "are" if bytes(got[bad - off:bad - off + 16]) == init
                    else "are not", init.hex()))

    def recheck(self):
        """Reads the ranges of failed reads again: still wrong, or not?"""
        for st, off, n in self.bad_reads[:3]:
            got = self.h.pread(n, off)
            want = st.model[off - st.off:off - st.off + n]
            if got == want:
                self.fail("read %d+%d again: now as the model" % (off, n))
            else:
                i = next(k for k in range(n) if got[k] != want[k])
                self.fail("read %d+%d again: still wrong from byte %d (%s)"
                          % (off, n, off + i, got[i:i + 16].hex()))

    def apply(self, st, off, data):
        st.model[off - st.off:off - st.off + len(data)] = data
        st.unknown.remove(off, off + len(data))

    def send_write(self, st, off, n, fua):
        data = self.rng.randbytes(n)
        what = self.log("write", off, n, "fua" if fua else "")
        self.stats["write"] += 1
        if fua:
            self.stats["fua"] += 1
        self.apply(st, off, data)
        st.busy.append((off, off + n))
        buf = nbd.Buffer.from_bytearray(bytearray(data))
        self.h.aio_pwrite(buf, off,
                          completion=self.completion(st, off, off + n, what),
                          flags=nbd.CMD_FLAG_FUA if fua else 0)

    def send_zero(self, st, off, n):
        flags = 0
        if self.rng.random() < 0.4:
            flags |= nbd.CMD_FLAG_NO_HOLE
        if self.rng.random() < 0.1:
            flags |= nbd.CMD_FLAG_FUA
        what = self.log("zero", off, n, "flags=%#x" % flags)
        self.stats["zero"] += 1
        self.apply(st, off, bytes(n))
        st.busy.append((off, off + n))
        self.h.aio_zero(n, off, flags=flags,
                        completion=self.completion(st, off, off + n, what))

    def send_trim(self, st, off, n):
        what = self.log("trim", off, n)
        self.stats["trim"] += 1
        st.unknown.add(off, off + n)
        st.busy.append((off, off + n))
        self.h.aio_trim(n, off,
                        completion=self.completion(st, off, off + n, what))

    def send_flush(self):
        what = self.log("flush", 0, 0)
        self.stats["flush"] += 1
        self.h.aio_flush(completion=self.completion(None, 0, 0, what))

    def drain(self):
        while self.h.aio_in_flight() > 0:
            self.h.poll(-1)

    # -- phases -----------------------------------------------------------

    def run(self):
        end = time.monotonic() + self.secs
        while time.monotonic() < end and not self.failures:
            while self.h.aio_in_flight() < DEPTH:
                if not self.submit_one():
                    break
            self.h.poll(-1)
        self.drain()

    def settle(self):
        """Writes every unknown range, so the model is exact again."""
        filled = 0
        for st in self.stripes:
            for a, b in list(st.unknown.r):
                at = a
                while at < b:
                    n = min(MAX_REQ, b - at)
                    data = self.rng.randbytes(n)
                    self.log("write", at, n, "settle")
                    self.h.pwrite(data, at)
                    self.apply(st, at, data)
                    filled += n
                    at += n
        self.stats["settled_bytes"] = filled

    def verify_all(self):
        for st in self.stripes:
            got = self.h.pread(st.len, st.off)
            if got != st.model:
                i = next(k for k in range(st.len) if got[k] != st.model[k])
                bad = st.off + i
                self.fail("final read of stripe %d+%d: byte %d reads %s, "
                          "model has %s" % (st.off, st.len, bad,
                                            got[i:i + 16].hex(),
                                            bytes(st.model[i:i + 16]).hex()),
                          bad)
                return

    def write_expected(self):
        with open(self.expected, "r+b") as f:
            for st in self.stripes:
                f.seek(st.off)
                f.write(st.model)


def main():
    c = Conn(sys.argv[1:])
    print("connected", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        print("FAIL no go: %r" % line, flush=True)
        sys.exit(1)
    try:
        c.run()
        if not c.failures:
            c.settle()
            c.verify_all()
        if not c.failures:
            c.write_expected()
        else:
            c.drain()
            c.recheck()
        c.h.shutdown()
    except nbd.Error as e:
        c.fail("libnbd: %s" % e)
    if c.failures:
        print("FAIL conn %d (seed %d): %s" % (c.conn, c.seed,
                                              "\n".join(c.failures[:8])),
              flush=True)
        sys.exit(1)
    print("done conn %d stripes %d %s" % (
        c.conn, len(c.stripes),
        " ".join("%s=%s" % kv for kv in sorted(c.stats.items()))),
        flush=True)


if __name__ == "__main__":
    main()
