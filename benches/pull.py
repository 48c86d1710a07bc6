#!/usr/bin/python3
"""Client side of benches/pull.sh: pull-backup sessions over QMP, and a
rate-limited random writer. The same code drives both daemons; only the
QMP sequence of a begin differs (--seq).

    pull.py write URI --rate IOPS [--bs 4096] [--qd 16] [--cluster 65536]
                      [--seed 1] [--ready FILE]
        4K (--bs) writes at uniformly random --bs-aligned offsets, issued
        on a fixed schedule (the n-th one due at start + n / rate, at most
        --qd in flight) until SIGTERM or SIGINT; then waits for the ones in
        flight and prints {"ops", "secs", "iops", "clusters" (distinct
        --cluster-sized clusters written), "max_lag" (seconds the latest
        write was issued after it was due)}. --ready FILE is created once
        connected.

    pull.py begin|end|first-byte QMP SESSION-OPTIONS...
        begin: builds a session and prints {"secs", "disks": [...]};
        end: takes it down; first-byte: --reps times begin, then the first
        512 bytes of every export read over NBD (one libnbd connection
        per export, with the qemu:dirty-bitmap:backup-DISK context when
        incremental), timed from sending the first command; then (untimed)
        each export's dirty bytes by NBD block status, and end. Prints
        {"secs": [...], "median", "min", "begun": [...] (the same until the
        last reply of the begin), "begun_median", "dirty": {disk: bytes}}.

    SESSION-OPTIONS:
      --seq libvirt|session   libvirt: the QMP commands libvirt sends for
                              a pull backup (qemu-storage-daemon); session:
                              one x-tidemark-backup-begin / -end
      --sock NBD-SOCKET --id ID --size BYTES --scratch-dir DIR
      --disk NODE=IMAGE ...   the disks (IMAGE: the file, for the scratch's
                              backing-file name)
      [--incremental C] [--checkpoint C] [--granularity BYTES]
      [--create blockdev-create|qemu-img] [--reps N] [--timeout S]

The libvirt sequence, for each disk D (scratch node S = scratch-D):
  1. scratch: with --create blockdev-create (default) the empty file is
     created (as libvirt does, for its security labels), blockdev-add of a
     file node S-storage, blockdev-create of a qcow2 (backing-file = the
     disk's image, backing-fmt qcow2) on it as a job; all disks' jobs are
     started, then awaited (JOB_STATUS_CHANGE concluded), checked with one
     query-jobs and dismissed; then blockdev-add of S, format qcow2, with
     backing = D. With --create qemu-img: `qemu-img create -f qcow2 -b
     IMAGE -F qcow2 FILE SIZE`, then blockdev-add of S over the file.
  2. one transaction: block-dirty-bitmap-add of the new checkpoint on D
     (persistent), block-dirty-bitmap-add of a disabled transient
     backup-D on S and block-dirty-bitmap-merge of the old checkpoint
     into it (incremental only), blockdev-backup sync=none D -> S.
  3. block-export-add of S, read-only, named ID-D (with bitmap backup-D).
end (libvirt): block-export-del of each (BLOCK_EXPORT_DELETED awaited),
block-job-cancel (BLOCK_JOB_CANCELLED), blockdev-del of S (and
S-storage), removal of the new checkpoint (a transaction), the files.
end (session): x-tidemark-backup-end success=false.

Uses benches/qmp_job.py's QMP client; needs Debian's python3-libnbd.
"""

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in benches/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmp_job import Failed, Qmp  # noqa: E402

import nbd  # noqa: E402


# ---- the rate-limited writer ------------------------------------------------

def cmd_write(a):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    h = nbd.NBD()
    h.connect_uri(a.uri)
    if h.is_read_only():
        sys.exit("export is read-only")
    nblocks = h.get_size() // a.bs
    if nblocks < 1:
        sys.exit("export smaller than one block")
    rng = random.Random(a.seed)
    bufs = [nbd.Buffer.from_bytearray(bytearray(rng.randbytes(a.bs))) for _ in range(a.qd)]
    free = list(range(a.qd))
    inflight = {}
    clusters = set()
    if a.ready:
        open(a.ready, "w").close()

    interval = 1.0 / a.rate
    start = time.monotonic()
    issued = done = 0
    max_lag = 0.0

    def reap():
        nonlocal done
        while inflight:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                return
            h.aio_command_completed(cookie)  # raises nbd.Error on an I/O error
            free.append(inflight.pop(cookie))
            done += 1

    while not stop:
        now = time.monotonic()
        due = start + issued * interval
        while due <= now and free and not stop:
            off = rng.randrange(nblocks) * a.bs
            slot = free.pop()
            inflight[h.aio_pwrite(bufs[slot], off)] = slot
            clusters.add(off // a.cluster)
            max_lag = max(max_lag, now - due)
            issued += 1
            due = start + issued * interval
        if stop:
            break
        # until the next write is due (poll's unit is 1 ms), or a completion
        wait = (due - time.monotonic()) if free else 0.1
        wait_ms = min(100, max(1, int(wait * 1000 + 0.999)))
        if inflight:
            try:
                h.poll(wait_ms)
            except nbd.Error:
                if not stop:  # else EINTR from the stop signal
                    raise
            reap()
        else:
            time.sleep(wait_ms / 1000)
    while inflight:
        h.poll(1000)
        reap()
    secs = time.monotonic() - start
    h.shutdown()
    print(json.dumps({"ops": done, "secs": round(secs, 3), "iops": round(done / secs, 1),
                      "clusters": len(clusters), "max_lag": round(max_lag, 4),
                      "rate": a.rate, "bs": a.bs}))


# ---- sessions ---------------------------------------------------------------

class Session:
    def __init__(self, a):
        self.a = a
        self.disks = []
        for spec in a.disk:
            node, _, image = spec.partition("=")
            self.disks.append({
                "node": node, "image": image,
                "scratch": os.path.join(a.scratch_dir, "scratch-%s-%s.qcow2" % (a.id, node)),
                "snode": "scratch-%s" % node,
                "export": "%s-%s" % (a.id, node),
                "job": "backup-%s-%s" % (a.id, node),
                "bitmap": "backup-%s" % node if a.incremental else None,
            })

    def uri(self, d):
        return "nbd+unix:///%s?socket=%s" % (d["export"], self.a.sock)

    # -- begin --

    def begin(self, q):
        if self.a.seq == "session":
            args = {"id": self.a.id,
                    "disks": [{"node": d["node"], "scratch": d["scratch"]} for d in self.disks]}
            if self.a.incremental:
                args["incremental"] = self.a.incremental
            if self.a.checkpoint:
                args["checkpoint"] = self.a.checkpoint
            return q.execute("x-tidemark-backup-begin", args, "x-tidemark-backup-begin")
        self.libvirt_scratch(q)
        actions = []
        for d in self.disks:
            if self.a.checkpoint:
                add = {"node": d["node"], "name": self.a.checkpoint, "persistent": True}
                if self.a.granularity:
                    add["granularity"] = self.a.granularity
                actions.append({"type": "block-dirty-bitmap-add", "data": add})
            if d["bitmap"]:
                add = {"node": d["snode"], "name": d["bitmap"], "persistent": False, "disabled": True}
                if self.a.granularity:
                    add["granularity"] = self.a.granularity
                actions.append({"type": "block-dirty-bitmap-add", "data": add})
                actions.append({"type": "block-dirty-bitmap-merge", "data": {
                    "node": d["snode"], "target": d["bitmap"],
                    "bitmaps": [{"node": d["node"], "name": self.a.incremental}]}})
            actions.append({"type": "blockdev-backup", "data": {
                "device": d["node"], "job-id": d["job"], "target": d["snode"], "sync": "none"}})
        q.execute("transaction", {"actions": actions}, "transaction")
        for d in self.disks:
            exp = {"type": "nbd", "id": d["export"], "node-name": d["snode"],
                   "name": d["export"], "writable": False}
            if d["bitmap"]:
                exp["bitmaps"] = [d["bitmap"]]
            q.execute("block-export-add", exp, "block-export-add")
        return None

    def libvirt_scratch(self, q):
        a = self.a
        if a.create == "qemu-img":
            for d in self.disks:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                                "-b", d["image"], "-F", "qcow2", d["scratch"], str(a.size)], check=True)
                q.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": d["snode"], "backing": d["node"],
                    "file": {"driver": "file", "node-name": d["snode"] + "-storage",
                             "filename": d["scratch"]}}, "blockdev-add")
            return
        for d in self.disks:
            open(d["scratch"], "x").close()
            q.execute("blockdev-add", {"driver": "file", "node-name": d["snode"] + "-storage",
                                       "filename": d["scratch"]}, "blockdev-add")
            q.execute("blockdev-create", {"job-id": "create-" + d["snode"], "options": {
                "driver": "qcow2", "file": d["snode"] + "-storage", "size": a.size,
                "cluster-size": 65536, "backing-file": d["image"], "backing-fmt": "qcow2"}},
                "blockdev-create")
        wait_status(q, ["create-" + d["snode"] for d in self.disks], "concluded")
        jobs = {j["id"]: j for j in q.execute("query-jobs", {}, "query-jobs")}
        for d in self.disks:
            j = jobs.get("create-" + d["snode"], {})
            if "error" in j:
                raise Failed("blockdev-create", "JobError", j["error"])
            q.execute("job-dismiss", {"id": "create-" + d["snode"]}, "job-dismiss")
        for d in self.disks:
            q.execute("blockdev-add", {"driver": "qcow2", "node-name": d["snode"],
                                       "file": d["snode"] + "-storage", "backing": d["node"]},
                      "blockdev-add")

    # -- end --

    def end(self, q):
        if self.a.seq == "session":
            q.execute("x-tidemark-backup-end", {"id": self.a.id, "success": False}, "x-tidemark-backup-end")
            return
        for d in self.disks:
            q.execute("block-export-del", {"id": d["export"]}, "block-export-del")
        wait_events(q, "BLOCK_EXPORT_DELETED", [d["export"] for d in self.disks])
        for d in self.disks:
            q.execute("block-job-cancel", {"device": d["job"]}, "block-job-cancel")
        wait_events(q, "BLOCK_JOB_CANCELLED", [d["job"] for d in self.disks])
        for d in self.disks:
            q.execute("blockdev-del", {"node-name": d["snode"]}, "blockdev-del")
            if self.a.create != "qemu-img":
                q.execute("blockdev-del", {"node-name": d["snode"] + "-storage"}, "blockdev-del")
        if self.a.checkpoint:
            q.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-remove", "data": {"node": d["node"], "name": self.a.checkpoint}}
                for d in self.disks]}, "transaction")
        for d in self.disks:
            os.unlink(d["scratch"])


def wait_status(q, ids, status):
    """Waits until every job in ids had a JOB_STATUS_CHANGE to status."""
    left = set(ids)
    while left:
        while q.events:
            name, data, _ = q.events.pop(0)
            if name == "JOB_STATUS_CHANGE" and data.get("status") == status:
                left.discard(data.get("id"))
        if left:
            msg, at = q._line("JOB_STATUS_CHANGE:" + status)
            if "event" in msg:
                q._queue(msg, at)


def wait_events(q, event, ids):
    """Waits for EVENT of each id (data.id, or data.device for jobs)."""
    left = set(ids)
    while left:
        while q.events:
            name, data, _ = q.events.pop(0)
            if name == event:
                left.discard(data.get("id", data.get("device")))
        if left:
            msg, at = q._line(event)
            if "event" in msg:
                q._queue(msg, at)


def connect(a):
    q = Qmp(a.qmp, time.monotonic() + a.timeout)
    q.greet()
    return q


def first_bytes(sess):
    """One connection per export, the first 512 bytes read; the handles."""
    handles = []
    for d in sess.disks:
        h = nbd.NBD()
        if d["bitmap"]:
            h.add_meta_context("qemu:dirty-bitmap:" + d["bitmap"])
        h.connect_uri(sess.uri(d))
        h.pread(512, 0)
        handles.append(h)
    return handles


def dirty_bytes(h, ctx):
    """Bytes with the dirty flag in context ctx, by NBD block status."""
    if not h.can_meta_context(ctx):
        raise RuntimeError("the export does not offer " + ctx)
    size, off, total = h.get_size(), 0, 0
    while off < size:
        got = []

        def cb(meta, _off, entries, _err):
            if meta == ctx:
                got.extend(entries)
            return 0
        h.block_status(size - off, off, cb)
        if not got:
            raise RuntimeError("no extents for " + ctx)
        for i in range(0, len(got), 2):
            n = min(got[i], size - off)
            if got[i + 1] & 1:
                total += n
            off += n
            if off >= size:
                break
    return total


def cmd_session(a):
    sess = Session(a)
    out = {"ok": True}
    q = None
    try:
        q = connect(a)
        if a.cmd == "begin":
            t0 = time.monotonic()
            ret = sess.begin(q)
            out["secs"] = round(time.monotonic() - t0, 6)
            out["returns"] = ret
            out["exports"] = [{"node": d["node"], "uri": sess.uri(d), "scratch": d["scratch"],
                               "bitmap": d["bitmap"]} for d in sess.disks]
        elif a.cmd == "end":
            sess.end(q)
        else:
            times, begun, dirty, uris = [], [], {}, []
            for rep in range(a.reps):
                t0 = time.monotonic()
                ret = sess.begin(q)
                t1 = time.monotonic()
                handles = first_bytes(sess)
                times.append(time.monotonic() - t0)
                begun.append(t1 - t0)
                if rep == 0 and ret is not None:
                    uris = [(r["uri"], sess.uri(d)) for r, d in zip(ret["disks"], sess.disks)
                            if r.get("uri") != sess.uri(d)]
                    out["reply_dirty"] = {r["node"]: r.get("dirty-bytes") for r in ret["disks"]}
                for d, h in zip(sess.disks, handles):
                    if d["bitmap"]:
                        n = dirty_bytes(h, "qemu:dirty-bitmap:" + d["bitmap"])
                        if dirty.setdefault(d["node"], n) != n:
                            raise RuntimeError("%s: %d dirty bytes, %d in the first rep"
                                               % (d["node"], n, dirty[d["node"]]))
                    h.shutdown()
                del handles, h
                sess.end(q)
            out.update(secs=[round(t, 6) for t in times], median=round(statistics.median(times), 6),
                       min=round(min(times), 6), dirty=dirty,
                       begun=[round(t, 6) for t in begun], begun_median=round(statistics.median(begun), 6))
            if uris:
                out["uri_mismatch"] = uris
    except Failed as e:
        out.update(ok=False, failed=e.step, error={"class": e.cls, "desc": e.desc})
    except (OSError, ValueError, RuntimeError, nbd.Error, subprocess.CalledProcessError) as e:
        out.update(ok=False, failed=a.cmd, error={"class": type(e).__name__, "desc": str(e)})
    out["events"] = q.seen if q else []
    print(json.dumps(out))
    if not out["ok"]:
        print("pull.py: %s: %s" % (out["failed"], out["error"]["desc"]), file=sys.stderr)
        return 1
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("uri")
    w.add_argument("--rate", type=float, required=True)
    w.add_argument("--bs", type=int, default=4096)
    w.add_argument("--qd", type=int, default=16)
    w.add_argument("--cluster", type=int, default=65536)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--ready")
    for c in ("begin", "end", "first-byte"):
        s = sub.add_parser(c)
        s.add_argument("qmp")
        s.add_argument("--seq", choices=["libvirt", "session"], required=True)
        s.add_argument("--sock", required=True)
        s.add_argument("--id", required=True)
        s.add_argument("--size", type=int, required=True)
        s.add_argument("--scratch-dir", required=True)
        s.add_argument("--disk", action="append", required=True)
        s.add_argument("--incremental")
        s.add_argument("--checkpoint")
        s.add_argument("--granularity", type=int)
        s.add_argument("--create", choices=["blockdev-create", "qemu-img"], default="blockdev-create")
        s.add_argument("--reps", type=int, default=1)
        s.add_argument("--timeout", type=float, default=600)
    a = p.parse_args()
    if a.cmd == "write":
        if a.rate <= 0 or a.qd < 1:
            sys.exit("--rate and --qd must be positive")
        cmd_write(a)
        return 0
    return cmd_session(a)


if __name__ == "__main__":
    sys.exit(main())
