#!/usr/bin/python3
"""NBD and QMP loads for benches/intent.sh (the intent log of persistent bitmaps).

    intent_io.py scatter URI --zone BYTES [--zones N|all] [--len BYTES] [--qd 16]
                 [--seed 1] [--ranges FILE] [--flush]
        one LEN-byte write (LEN-aligned, random place) in each of N distinct
        random zones of ZONE bytes (all: every zone, in order), QD requests
        in flight (then one flush with --flush); prints {"writes", "secs"};
        the ranges written go to FILE ("offset length" lines)
    intent_io.py latency URI --secs S [--qd 1] [--bs 4096] [--seed 1] [--rate R] --out FILE
        random writes (BS-aligned, uniform over the export) for S seconds,
        at most QD in flight and, with --rate, at most R per second (a
        request is not sent before its turn; turns missed while QD requests
        were in flight are skipped, not caught up); each request's submit
        and completion time
        (time.monotonic) go to FILE; prints {"ops", "iops", "secs"}
    intent_io.py stores QMP --node NODE --secs S [--every 1] [--delay 0] --out FILE
        x-tidemark-bitmap-store {"node": NODE} every EVERY seconds (from DELAY
        until S), one QMP connection; the [sent, replied] interval of each
        (time.monotonic) goes to FILE as JSON; prints {"stores", "mean", "max"}
    intent_io.py analyze LATFILE [STORESFILE] [--after 1]
        p50 / p99 / max latency (ms) of the requests that overlapped a store
        point (during), of those that did not (outside), and of the outside
        ones split by whether they started within AFTER seconds of a store
        point's end (after) or not (rest); prints JSON
    intent_io.py qmpwait QMP --node NODE [--timeout 60]
        connects (retrying every 2 ms) until query-named-block-nodes lists
        NODE with its dirty bitmaps; prints {"at": time.time() of the answer,
        "bitmaps": [...], "flags": {name: [on-disk flags]}}
    intent_io.py covered URI --ranges FILE BITMAP...
        checks over NBD (qemu:dirty-bitmap:BITMAP contexts) that every range
        of FILE is dirty in every BITMAP; prints {"ranges", "bitmaps", "missing"}
    intent_io.py flushes TRACE [--from BYTE] [--to BYTE]
        counts the flush records (op 4) of a TIDEMARK_IO_TRACE file between
        byte offsets FROM and TO (record boundaries); prints {"flushes", "writes"}

time.monotonic is CLOCK_MONOTONIC, one clock for every process of the host,
so latency and store intervals from two processes compare. Needs Debian's
python3-libnbd for the NBD subcommands (run it with /usr/bin/python3).
"""

import argparse
import json
import os
import random
import socket
import struct
import sys
import time
from array import array

sys.dont_write_bytecode = True  # qmp_job.py is imported from benches/: no __pycache__ there
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def nbd_connect(uri, contexts=()):
    import nbd
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def run_aio(h, jobs, qd):
    """Issues pwrite jobs (buffer, offset), QD in flight; waits for all."""
    inflight = 0
    it = iter(jobs)
    done = False
    while True:
        while not done and inflight < qd:
            try:
                buf, off = next(it)
            except StopIteration:
                done = True
                break
            h.aio_pwrite(buf, off)
            inflight += 1
        if inflight == 0:
            return
        h.poll(-1)
        while inflight:
            c = h.aio_peek_command_completed()
            if c <= 0:
                break
            h.aio_command_completed(c)  # raises nbd.Error on an I/O error
            inflight -= 1


def scatter(a):
    import nbd
    h = nbd_connect(a.uri)
    size = h.get_size()
    nz = size // a.zone
    rng = random.Random(a.seed)
    if a.zones == "all":
        zones = list(range(nz))
    else:
        n = int(a.zones)
        if n > nz:
            sys.exit("only %d zones" % nz)
        zones = rng.sample(range(nz), n)
    buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(a.len)))
    ranges = []
    for z in zones:
        off = z * a.zone + rng.randrange(a.zone // a.len) * a.len
        ranges.append(off)
    t0 = time.monotonic()
    run_aio(h, ((buf, off) for off in ranges), a.qd)
    if a.flush:
        h.flush()
    secs = time.monotonic() - t0
    h.shutdown()
    if a.ranges:
        with open(a.ranges, "w") as f:
            for off in sorted(ranges):
                f.write("%d %d\n" % (off, a.len))
    print(json.dumps({"writes": len(ranges), "secs": round(secs, 3)}))


def latency(a):
    import nbd
    h = nbd_connect(a.uri)
    nblocks = h.get_size() // a.bs
    rng = random.Random(a.seed)
    bufs = [nbd.Buffer.from_bytearray(bytearray(rng.randbytes(a.bs))) for _ in range(a.qd)]
    starts, ends = array("d"), array("d")
    inflight = {}  # cookie -> (slot, submit time)
    free = list(range(a.qd))
    now = time.monotonic
    gap = 1.0 / a.rate if a.rate > 0 else 0.0

    t0 = now()
    deadline = t0 + a.secs
    due = t0  # when the next request may go (rate limit; missed slots are skipped)
    while True:
        t = now()
        while free and t < deadline and t >= due:
            slot = free.pop()
            off = rng.randrange(nblocks) * a.bs
            inflight[h.aio_pwrite(bufs[slot], off)] = (slot, t)
            due = max(due + gap, t) if gap else t
            t = now()
        if not inflight:
            if t >= deadline:
                break
            time.sleep(max(0.0, min(due, deadline) - t))
            continue
        # wait for a completion, or until the next request is due
        wait = -1
        if free and t < deadline:
            wait = max(0, int(1000 * (min(due, deadline) - t)))
        h.poll(wait)
        t = now()
        while inflight:
            c = h.aio_peek_command_completed()
            if c <= 0:
                break
            h.aio_command_completed(c)  # raises nbd.Error on an I/O error
            slot, ts = inflight.pop(c)
            starts.append(ts)
            ends.append(t)
            free.append(slot)
    secs = now() - t0
    h.shutdown()
    with open(a.out, "wb") as f:
        f.write(struct.pack("<Q", len(starts)))
        starts.tofile(f)
        ends.tofile(f)
    print(json.dumps({"ops": len(starts), "iops": round(len(starts) / secs), "secs": round(secs, 3)}))


def stores(a):
    from qmp_job import Failed, Qmp
    q = Qmp(a.qmp, time.monotonic() + a.secs + 60)
    out = {"intervals": [], "errors": []}
    try:
        q.greet()
        t0 = time.monotonic()
        nxt = t0 + a.delay
        while True:
            wait = nxt - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if time.monotonic() - t0 >= a.secs:
                break
            s = time.monotonic()
            try:
                q.execute("x-tidemark-bitmap-store", {"node": a.node}, "store")
            except Failed as e:
                out["errors"].append(e.desc)
                if e.cls in ("Timeout", "Closed"):
                    break
            out["intervals"].append([s, time.monotonic()])
            nxt += a.every
    except (Failed, OSError) as e:
        out["errors"].append(str(e))
    with open(a.out, "w") as f:
        json.dump(out, f)
    d = [e - s for s, e in out["intervals"]]
    print(json.dumps({"stores": len(d), "errors": out["errors"][:3],
                      "mean_ms": round(1000 * sum(d) / len(d), 2) if d else None,
                      "max_ms": round(1000 * max(d), 2) if d else None}))
    return 1 if out["errors"] else 0


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def analyze(a):
    with open(a.lat, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        starts, ends = array("d"), array("d")
        starts.fromfile(f, n)
        ends.fromfile(f, n)
    intervals = []
    if a.stores:
        with open(a.stores) as f:
            intervals = sorted(json.load(f)["intervals"])
    during, after, rest = [], [], []
    ends_sorted = sorted(e for _, e in intervals)
    import bisect
    # a request overlaps [s, e] when start < e and end > s
    order = sorted(range(n), key=lambda i: starts[i])
    j = 0
    for i in order:
        s, e = starts[i], ends[i]
        while j < len(intervals) and intervals[j][1] <= s:
            j += 1
        k, hit = j, False
        while k < len(intervals) and intervals[k][0] < e:
            if intervals[k][1] > s:
                hit = True
                break
            k += 1
        lat = 1000 * (e - s)
        if hit:
            during.append(lat)
            continue
        # outside: did a store point end at most AFTER seconds before it started?
        p = bisect.bisect_right(ends_sorted, s)
        if p and s - ends_sorted[p - 1] <= a.after:
            after.append(lat)
        else:
            rest.append(lat)
    outside = after + rest

    def summary(v):
        v.sort()
        return {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "max": v[-1] if v else None}

    d = [1000 * (e - s) for s, e in intervals]
    print(json.dumps({"during": summary(during), "outside": summary(outside),
                      "after": summary(after), "rest": summary(rest),
                      "stores": len(d),
                      "store_mean": sum(d) / len(d) if d else None,
                      "store_max": max(d) if d else None}))


def qmpwait(a):
    from qmp_job import Failed, Qmp
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        try:
            q = Qmp(a.qmp, deadline)
            q.greet()
            nodes = q.execute("query-named-block-nodes", {}, "query")
        except (OSError, Failed):
            time.sleep(0.002)
            continue
        at = time.time()
        for n in nodes:
            if n.get("node-name") == a.node and "dirty-bitmaps" in n:
                fs = n.get("image", {}).get("format-specific", {}).get("data", {})
                flags = {b["name"]: b.get("flags", []) for b in fs.get("bitmaps", [])}
                print(json.dumps({"at": at, "bitmaps": n["dirty-bitmaps"], "flags": flags}))
                return 0
        q.sock.close()
        time.sleep(0.002)
    print(json.dumps({"error": "no answer with the node's bitmaps within the timeout"}))
    return 1


def covered(a):
    import nbd
    ctxs = ["qemu:dirty-bitmap:" + b for b in a.bitmaps]
    h = nbd_connect(a.uri, ctxs)
    for c in ctxs:
        if not h.can_meta_context(c):
            sys.exit("the server did not agree to " + c)
    ranges = [tuple(map(int, line.split())) for line in open(a.ranges) if line.strip()]
    missing = 0
    for off, length in ranges:
        end = off + length
        for c in ctxs:
            # walk the extents of context c from off until end or a clean one
            pos, clean = off, False
            while pos < end and not clean:
                got = []

                def cb(meta, offset, entries, err, c=c, got=got):
                    if meta == c:
                        got.append((offset, list(entries)))
                    return 0

                h.block_status(end - pos, pos, cb)
                if not got:
                    clean = True
                    break
                at, entries = got[0]
                for i in range(0, len(entries), 2):
                    if pos >= end:
                        break
                    if not entries[i + 1] & 1:
                        clean = True
                        break
                    at += entries[i]
                    pos = at
            if clean:
                missing += 1
    h.shutdown()
    print(json.dumps({"ranges": len(ranges), "bitmaps": len(ctxs), "missing": missing}))
    return 1 if missing else 0


def flushes(a):
    n_flush = n_write = 0
    with open(a.trace, "rb") as f:
        f.seek(a.start)
        while a.end is None or f.tell() < a.end:
            hdr = f.read(17)
            if len(hdr) < 17:
                break
            op, _off, length = struct.unpack("<BQQ", hdr)
            if op == 1:
                n_write += 1
                f.seek(length, 1)
            elif op == 4:
                n_flush += 1
    print(json.dumps({"flushes": n_flush, "writes": n_write}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scatter")
    s.add_argument("uri")
    s.add_argument("--zone", type=int, required=True)
    s.add_argument("--zones", default="all")
    s.add_argument("--len", type=int, default=4096)
    s.add_argument("--qd", type=int, default=16)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--ranges")
    s.add_argument("--flush", action="store_true")
    s = sub.add_parser("latency")
    s.add_argument("uri")
    s.add_argument("--secs", type=float, required=True)
    s.add_argument("--qd", type=int, default=1)
    s.add_argument("--bs", type=int, default=4096)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--rate", type=float, default=0, help="requests per second (0: as fast as QD allows)")
    s.add_argument("--out", required=True)
    s = sub.add_parser("stores")
    s.add_argument("qmp")
    s.add_argument("--node", required=True)
    s.add_argument("--secs", type=float, required=True)
    s.add_argument("--every", type=float, default=1.0)
    s.add_argument("--delay", type=float, default=0.0)
    s.add_argument("--out", required=True)
    s = sub.add_parser("analyze")
    s.add_argument("lat")
    s.add_argument("stores", nargs="?")
    s.add_argument("--after", type=float, default=1.0)
    s = sub.add_parser("qmpwait")
    s.add_argument("qmp")
    s.add_argument("--node", required=True)
    s.add_argument("--timeout", type=float, default=60)
    s = sub.add_parser("covered")
    s.add_argument("uri")
    s.add_argument("--ranges", required=True)
    s.add_argument("bitmaps", nargs="+")
    s = sub.add_parser("flushes")
    s.add_argument("trace")
    s.add_argument("--from", dest="start", type=int, default=0)
    s.add_argument("--to", dest="end", type=int)
    a = p.parse_args()
    return {"scatter": scatter, "latency": latency, "stores": stores, "analyze": analyze,
            "qmpwait": qmpwait, "covered": covered, "flushes": flushes}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
