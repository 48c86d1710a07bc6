#!/usr/bin/python3
"""NBD client for tests/live_data.rs (data integrity of live block operations).

    /usr/bin/python3 live_agent.py URI SHADOW SEED

Holds ONE libnbd connection to URI for its whole life (the export must stay
served across snapshots, commits and mirror pivots without the client
reconnecting) and a shadow copy of what the export must hold: SHADOW, a raw
file the test made from the image before the daemon started. Every
acknowledged write and write-zeroes is applied to the shadow and appended to
a log (phase, offset, length), so the test can compare images with the shadow
and dirty bitmaps with the log.

Data written: every 512-byte sector is stamped with WRITE_MAGIC ^ SEED, its
own offset, the number of the write and the phase number, so a wrong sector
names the write it came from.

Protocol: one command per line on stdin, one reply line on stdout, "ok ..."
or "err ...". Prints "ready SIZE" once connected.

  write OFF LEN       synchronous write of stamped data
  zero OFF LEN        synchronous write-zeroes
  flush               synchronous flush
  phase NAME          label of the writes from now on (log and stamps)
  mark                (writer paused) the checkpoint: "covers" checks the
                      writes logged from now on
  start               background writer: one thread keeps up to DEPTH
                      commands in flight (writes of 4 KiB to 64 KiB at 512-byte
                      aligned offsets, 1 in 10 a write-zeroes), never two
                      overlapping ranges in flight at once, so the shadow is
                      exact whatever order the server completes them in
  wait N              until N more background commands have been
                      acknowledged (deadline WAIT_DEADLINE): "ok TOTAL"
  pause               stop issuing, wait for those in flight: "ok TOTAL"
  verify              (writer paused) read the whole export, compare with
                      the shadow
  save PATH           (writer paused) copy the shadow to PATH
  diff PATH [PHASE]   compare raw file PATH with the shadow: everywhere, or
                      only on the extents written in phase PHASE
  covers URI NAME GRAN [exact]
                      (writer paused) a second connection to URI reads
                      qemu:dirty-bitmap:NAME; every logged write must lie in
                      dirty extents; with "exact", every dirty extent must
                      also meet a logged write rounded out to GRAN. Reply
                      "ok dirty=D written=W extra=X" (X: dirty bytes no write
                      explains)
  stats               JSON counters
  disconnect          pause, then NBD_CMD_DISC
  quit                exit 0

A failed NBD command is never fatal to the agent: it is recorded, stops the
background writer, and every later command that depends on the connection
replies "err" with the first few messages.
"""

import json
import os
import random
import struct
import sys
import threading
import time

import nbd

SECTOR = 512
DEPTH = 4
MIN_LEN = 4096
MAX_LEN = 65536
WRITE_MAGIC = 0x6C69_7665_6461_7461  # "livedata"
WAIT_DEADLINE = 30.0
CHUNK = 1 << 20
MAX_MESSAGES = 5


class Agent:
    def __init__(self, uri, shadow, seed):
        self.uri = uri
        self.seed = seed
        self.rng = random.Random(seed)
        self.shadow = open(shadow, "r+b")
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = self.h.get_size()
        assert os.fstat(self.shadow.fileno()).st_size == self.size, \
            "shadow and export differ in size"
        self.lock = threading.Condition()
        self.phase = 0
        self.phase_names = {"initial": 0}
        self.gen = 0
        # (phase, off, len, kind) of every acknowledged write or zero.
        self.log = []
        self.done = 0          # background commands acknowledged
        self.mark = 0          # log index of the checkpoint ("mark")
        self.messages = []
        self.failed = False
        self.thread = None
        self.stop_flag = False
        self.stats = {"writes": 0, "zeroes": 0, "bytes": 0, "flushes": 0}

    # ---- data ---------------------------------------------------------------

    def data(self, off, length):
        self.gen += 1
        return b"".join(
            struct.pack("<4Q", WRITE_MAGIC ^ self.seed, off + k, self.gen,
                        self.phase) * (SECTOR // 32)
            for k in range(0, length, SECTOR))

    def record(self, kind, off, length, data):
        # Called with self.lock held.
        if data is None:
            self.shadow.seek(off)
            self.shadow.write(bytes(length))
            self.stats["zeroes"] += 1
        else:
            self.shadow.seek(off)
            self.shadow.write(data)
            self.stats["writes"] += 1
        self.stats["bytes"] += length
        self.log.append((self.phase, off, length, kind))

    def fail(self, msg):
        with self.lock:
            self.failed = True
            if len(self.messages) < MAX_MESSAGES:
                self.messages.append(msg)
            self.lock.notify_all()

    def errors(self):
        return "; ".join(self.messages)

    # ---- background writer --------------------------------------------------

    def writer(self):
        h = self.h
        inflight = {}  # cookie-less: key -> (off, len)
        key = 0

        def overlaps(off, length):
            return any(off < o + n and o < off + length
                       for (o, n) in inflight.values())

        def issue():
            nonlocal key
            for _ in range(100):
                length = self.rng.randrange(MIN_LEN // SECTOR,
                                            MAX_LEN // SECTOR + 1) * SECTOR
                off = self.rng.randrange((self.size - length) // SECTOR + 1) * SECTOR
                if not overlaps(off, length):
                    break
            else:
                return False
            key += 1
            k = key
            inflight[k] = (off, length)
            zero = self.rng.random() < 0.1
            data = None if zero else self.data(off, length)

            def done(err, k=k, off=off, length=length, data=data):
                del inflight[k]
                if err.value != 0:
                    what = "write-zeroes" if data is None else "write"
                    self.fail(f"{what} {off}+{length} failed: errno {err.value}")
                    return 1
                with self.lock:
                    self.record("zero" if data is None else "write",
                                off, length, data)
                    self.done += 1
                    self.lock.notify_all()
                return 1
            if zero:
                h.aio_zero(length, off, completion=done)
            else:
                h.aio_pwrite(nbd.Buffer.from_bytearray(data), off,
                             completion=done)
            return True

        try:
            while not self.stop_flag and not self.failed:
                while h.aio_in_flight() < DEPTH and not self.stop_flag \
                        and not self.failed:
                    if not issue():
                        break
                if h.aio_in_flight() > 0:
                    h.poll(-1)
            while h.aio_in_flight() > 0:
                h.poll(-1)
        except Exception as e:  # nbd.Error: the connection broke
            self.fail(f"writer: {e}")

    def start(self):
        if self.thread is not None:
            return "err already running"
        if self.failed:
            return "err " + self.errors()
        self.stop_flag = False
        self.thread = threading.Thread(target=self.writer, daemon=True)
        self.thread.start()
        return "ok"

    def pause(self):
        if self.thread is not None:
            self.stop_flag = True
            self.thread.join(WAIT_DEADLINE)
            if self.thread.is_alive():
                return "err writer did not drain within deadline"
            self.thread = None
        if self.failed:
            return "err " + self.errors()
        return f"ok {self.done}"

    def wait(self, n):
        deadline = time.monotonic() + WAIT_DEADLINE
        with self.lock:
            want = self.done + n
            while self.done < want and not self.failed:
                left = deadline - time.monotonic()
                if left <= 0 or self.thread is None:
                    return (f"err {self.done - want + n} of {n} commands "
                            f"acknowledged before the deadline")
                self.lock.wait(left)
            if self.failed:
                return "err " + self.errors()
            return f"ok {self.done}"

    # ---- synchronous commands -----------------------------------------------

    def need_idle(self):
        if self.thread is not None:
            return "err the background writer runs (pause first)"
        if self.failed:
            return "err " + self.errors()
        return None

    def sync(self, kind, off, length):
        e = self.need_idle()
        if e:
            return e
        try:
            if kind == "write":
                data = self.data(off, length)
                self.h.pwrite(data, off)
            elif kind == "zero":
                data = None
                self.h.zero(length, off)
            else:
                self.h.flush()
                self.stats["flushes"] += 1
                return "ok"
        except nbd.Error as e:
            self.fail(f"{kind} {off}+{length}: {e}")
            return "err " + self.errors()
        with self.lock:
            self.record(kind, off, length, data)
        return "ok"

    def verify(self):
        e = self.need_idle()
        if e:
            return e
        bad = []
        off = 0
        try:
            while off < self.size:
                n = min(CHUNK, self.size - off)
                got = self.h.pread(n, off)
                self.shadow.seek(off)
                want = self.shadow.read(n)
                if got != want:
                    bad.extend(self.mismatches(got, want, off))
                off += n
        except nbd.Error as e:
            self.fail(f"read at {off}: {e}")
            return "err " + self.errors()
        if bad:
            return "err the export differs from the shadow: " + self.summary(bad)
        return "ok"

    def save(self, path):
        e = self.need_idle()
        if e:
            return e
        self.shadow.flush()
        self.shadow.seek(0)
        with open(path, "wb") as out:
            while True:
                b = self.shadow.read(CHUNK)
                if not b:
                    break
                out.write(b)
        return "ok"

    def diff(self, path, phase=None):
        self.shadow.flush()
        if phase is not None:
            if phase not in self.phase_names:
                return f"err no phase {phase}"
            p = self.phase_names[phase]
            extents = [(o, n) for (ph, o, n, _) in self.log if ph == p]
            if not extents:
                return f"err nothing was written in phase {phase}"
        else:
            extents = [(o, min(CHUNK, self.size - o))
                       for o in range(0, self.size, CHUNK)]
        bad = []
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != self.size:
                return f"err {path}: size {os.fstat(f.fileno()).st_size}, want {self.size}"
            for (o, n) in extents:
                f.seek(o)
                got = f.read(n)
                self.shadow.seek(o)
                want = self.shadow.read(n)
                if got != want:
                    bad.extend(self.mismatches(got, want, o))
        if bad:
            return f"err {path} differs from the shadow: " + self.summary(bad)
        return f"ok {len(extents)}"

    def mismatches(self, got, want, base):
        """Differing sector ranges: (start, end, what got holds at start)."""
        out = []
        for k in range(0, len(got), SECTOR):
            g, w = got[k:k + SECTOR], want[k:k + SECTOR]
            if g == w:
                continue
            at = base + k
            if out and out[-1][1] == at:
                out[-1][1] = at + SECTOR
            else:
                out.append([at, at + SECTOR, self.classify(g, at),
                            self.classify(w, at)])
        return out

    def classify(self, s, at):
        if s == bytes(len(s)):
            return "zeroes"
        magic, off, gen, phase = struct.unpack("<4Q", s[:32])
        if magic == WRITE_MAGIC ^ self.seed:
            names = {v: k for k, v in self.phase_names.items()}
            where = "" if off == at else f" for offset {off:#x}"
            return f"write #{gen} of phase {names.get(phase, phase)}{where}"
        return "other data " + s[:8].hex()

    def summary(self, bad):
        total = sum(b - a for (a, b, _, _) in bad)
        s = f"{total} bytes in {len(bad)} ranges;"
        for (a, b, got, want) in bad[:8]:
            s += f" [{a:#x},{b:#x}) holds {got}, want {want};"
        return s

    # ---- dirty bitmaps --------------------------------------------------------

    def covers(self, uri, name, gran, exact):
        e = self.need_idle()
        if e:
            return e
        ctx = "qemu:dirty-bitmap:" + name
        h = nbd.NBD()
        h.add_meta_context(ctx)
        try:
            h.connect_uri(uri)
        except nbd.Error as e:
            return f"err connect {uri}: {e}"
        try:
            if not h.can_meta_context(ctx):
                return f"err {uri} does not offer {ctx}"
            dirty = []  # sorted, merged [start, end)
            off = 0
            size = h.get_size()
            while off < size:
                got = []

                def cb(metacontext, o, entries, err):
                    if metacontext == ctx:
                        got.extend(entries)
                    return 0
                h.block_status(min(size - off, 1 << 30), off, cb)
                if not got:
                    return f"err no extents for {ctx} at {off}"
                for i in range(0, len(got), 2):
                    n, flags = got[i], got[i + 1]
                    if flags & 1:
                        if dirty and dirty[-1][1] == off:
                            dirty[-1][1] = off + n
                        else:
                            dirty.append([off, off + n])
                    off += n
            h.shutdown()
        except nbd.Error as e:
            return f"err block status of {ctx}: {e}"

        def dirty_at(a, b):
            # [a, b) lies inside one dirty extent (they are merged).
            lo, hi = 0, len(dirty)
            while lo < hi:
                mid = (lo + hi) // 2
                if dirty[mid][1] <= a:
                    lo = mid + 1
                else:
                    hi = mid
            return lo < len(dirty) and dirty[lo][0] <= a and b <= dirty[lo][1]

        since = self.log[self.mark:]
        missed = [(ph, o, n, k) for (ph, o, n, k) in since
                  if not dirty_at(o, o + n)]
        # Written ranges rounded out to the granularity, merged.
        rounded = sorted(((o // gran) * gran, -(-(o + n) // gran) * gran)
                         for (ph, o, n, _) in since)
        merged = []
        for a, b in rounded:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        written = sum(b - a for a, b in merged)
        total = sum(b - a for a, b in dirty)
        # Dirty bytes outside every rounded write.
        extra, j = 0, 0
        for a, b in dirty:
            covered = 0
            while j < len(merged) and merged[j][1] <= a:
                j += 1
            k = j
            while k < len(merged) and merged[k][0] < b:
                covered += min(b, merged[k][1]) - max(a, merged[k][0])
                k += 1
            extra += (b - a) - covered
        names = {v: k for k, v in self.phase_names.items()}
        if missed:
            s = f"err {ctx} misses {len(missed)} of {len(since)} writes since the checkpoint:"
            for (ph, o, n, k) in missed[:8]:
                s += f" {k} {o:#x}+{n:#x} (phase {names.get(ph, ph)});"
            return s + f" dirty extents: {len(dirty)}, {total} bytes"
        if exact and extra:
            return (f"err {ctx} has {extra} dirty bytes that no write since the "
                    f"checkpoint explains (dirty {total}, written {written} "
                    f"rounded to {gran})")
        return f"ok dirty={total} written={written} extra={extra}"

    # ---- main loop ------------------------------------------------------------

    def handle(self, words):
        cmd, args = words[0], words[1:]
        if cmd in ("write", "zero"):
            return self.sync(cmd, int(args[0], 0), int(args[1], 0))
        if cmd == "flush":
            return self.sync("flush", 0, 0)
        if cmd == "phase":
            with self.lock:
                if args[0] not in self.phase_names:
                    self.phase_names[args[0]] = len(self.phase_names)
                self.phase = self.phase_names[args[0]]
            return "ok"
        if cmd == "mark":
            e = self.need_idle()
            if e:
                return e
            self.mark = len(self.log)
            return "ok"
        if cmd == "start":
            return self.start()
        if cmd == "wait":
            return self.wait(int(args[0]))
        if cmd == "pause":
            return self.pause()
        if cmd == "verify":
            return self.verify()
        if cmd == "save":
            return self.save(args[0])
        if cmd == "diff":
            return self.diff(args[0], args[1] if len(args) > 1 else None)
        if cmd == "covers":
            return self.covers(args[0], args[1], int(args[2]),
                               len(args) > 3 and args[3] == "exact")
        if cmd == "stats":
            d = dict(self.stats, done=self.done, log=len(self.log),
                     failed=self.failed, messages=self.messages)
            return "ok " + json.dumps(d)
        if cmd == "disconnect":
            r = self.pause()
            if not r.startswith("ok"):
                return r
            try:
                self.h.shutdown()
            except nbd.Error as e:
                return f"err shutdown: {e}"
            return "ok"
        return f"err unknown command {cmd}"


def main():
    uri, shadow, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    agent = Agent(uri, shadow, seed)
    print(f"ready {agent.size}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            reply = agent.handle(words)
        except Exception as e:  # a bug here: say so instead of hanging the test
            reply = f"err {words[0]}: {type(e).__name__}: {e}"
        print(reply.replace("\n", " "), flush=True)
    agent.pause()
    agent.shadow.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
