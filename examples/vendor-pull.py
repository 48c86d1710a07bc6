#!/usr/bin/python3
"""A backup vendor's agent, virtnbdbackup-style, against tidemark's pull-backup
sessions: one QMP call begins the session, libnbd pulls only what is needed,
one QMP call ends it.

    vendor-pull.py --qmp SOCK --disk NODE [--disk NODE ...] --out DIR
                   [--incremental CHECKPOINT] --checkpoint NEW
                   [--id ID] [--scratch-dir DIR] [--freeze CMD] [--thaw CMD]
                   [--json]

 1. [--freeze CMD runs first: a vendor would fs-freeze the guest through its
    agent here.] x-tidemark-backup-begin over every --disk at once, with the
    new checkpoint NEW and, for an incremental, the base CHECKPOINT. The reply
    gives each disk's export URI, size, bitmap (backup-NODE) and dirty bytes.
    [--thaw CMD runs right after the reply, or after a failed begin.]
 2. Per disk, one libnbd connection to the session's export with the meta
    contexts base:allocation and, for an incremental, qemu:dirty-bitmap:
    backup-NODE. Block status over the whole disk says what to pull:
    - full: the extents that do not read as zeroes (NBD_STATE_ZERO clear),
      into a new qcow2 image DIR/NODE.NEW.qcow2; holes and zeroes are skipped
      (a new qcow2 reads as zeroes there);
    - incremental: only the dirty extents, into a qcow2 overlay
      DIR/NODE.NEW.qcow2 whose backing file is the previous backup
      NODE.CHECKPOINT.qcow2 (relative, so the directory can move). A dirty
      extent that now reads as zeroes becomes a write-zeroes in the overlay,
      which hides the old data in the backing file.
    The image is written through qemu-nbd, which libnbd starts itself (systemd
    socket activation: no socket file, no pid file) and reaps on close. It is
    built under a .part name and renamed only once complete.
 3. x-tidemark-backup-end with success true, or false on any error (the
    session then takes its new checkpoint back, so the next incremental from
    CHECKPOINT still covers every write). Partial images are removed.

The restore of disk NODE at checkpoint NEW is the chain DIR/NODE.NEW.qcow2:
`qemu-img convert -O raw DIR/NODE.NEW.qcow2 restored.raw`.

Output: one summary line per disk and a total ("pulled N bytes"); with
--json, instead, one JSON line {"disks": [...], "pulled": N}. Exit status 0 on
success, 1 on failure (the reason on stderr), 2 on bad usage.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys

import nbd

BASE_ALLOCATION = "base:allocation"
DIRTY_PREFIX = "qemu:dirty-bitmap:"
STATE_ZERO = 2  # base:allocation: the extent reads as zeroes
STATE_DIRTY = 1  # qemu:dirty-bitmap:NAME
STATUS_CHUNK = 1 << 30  # block status request length
COPY_CHUNK = 8 << 20  # largest read/write request
ZERO_CHUNK = 1 << 30  # largest write-zeroes request


class Failure(Exception):
    """What went wrong, for the user."""


class Interrupted(Failure):
    pass


stop_signal = []


def on_signal(signum, _frame):
    """SIGINT and SIGTERM are noted, and acted upon at the next safe point
    (checked()): a QMP exchange is never cut in half, so the session's state
    is always known, and the session always ends."""
    stop_signal.append(signum)


def checked():
    if stop_signal:
        raise Interrupted(f"interrupted by signal {stop_signal[0]}")


# ---- QMP -----------------------------------------------------------------------


class Qmp:
    """The smallest QMP client: one unix socket, commands in order, events
    ignored."""

    def __init__(self, path, timeout=120):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            raise Failure(f"QMP: cannot connect to {path}: {e}") from e
        self.f = self.sock.makefile("rw")
        greeting = self.recv()
        if "QMP" not in greeting:
            raise Failure(f"QMP: unexpected greeting {greeting}")
        self.execute("qmp_capabilities")

    def recv(self):
        line = self.f.readline()
        if not line:
            raise Failure("QMP: the monitor closed the connection")
        return json.loads(line)

    def execute(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            m = self.recv()
            if "event" in m:
                continue
            if "error" in m:
                raise Failure(f"{name}: {m['error'].get('desc', m['error'])}")
            return m.get("return")

    def close(self):
        self.f.close()
        self.sock.close()


# ---- extents -------------------------------------------------------------------


def block_status(h, pos, length, contexts):
    """Extents of each context from pos, over the part of [pos, pos+length)
    that every context covered: ({context: [(off, len, flags)]}, end)."""
    got = {c: [] for c in contexts}

    def cb(metacontext, offset, entries, err):
        if metacontext in got:
            at = offset
            for i in range(0, len(entries), 2):
                got[metacontext].append((at, entries[i], entries[i + 1]))
                at += entries[i]
        return 0

    h.block_status(length, pos, cb)
    end = pos + length
    for c, ext in got.items():
        if not ext:
            raise Failure(f"no {c} extents at offset {pos}")
        end = min(end, ext[-1][0] + ext[-1][1])
    out = {}
    for c, ext in got.items():
        out[c] = [(o, min(n, end - o), f) for (o, n, f) in ext if o < end]
    return out, end


def plan(h, size, dirty_ctx):
    """What to pull: a list of (off, len, kind), kind "data" or "zero", in
    order and merged. Without a dirty context (a full backup): every extent
    that does not read as zeroes is data; the rest is skipped. With one (an
    incremental): only dirty extents, data or zero as base:allocation says."""
    contexts = [BASE_ALLOCATION] + ([dirty_ctx] if dirty_ctx else [])
    out = []

    def add(off, length, kind):
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((off, length, kind))

    pos = 0
    while pos < size:
        checked()
        ext, end = block_status(h, pos, min(size - pos, STATUS_CHUNK), contexts)
        alloc = ext[BASE_ALLOCATION]
        dirty = ext[dirty_ctx] if dirty_ctx else [(pos, end - pos, STATE_DIRTY)]
        # Walk both lists at once: each piece lies in one extent of each.
        i = j = 0
        at = pos
        while at < end:
            a_off, a_len, a_flags = alloc[i]
            d_off, d_len, d_flags = dirty[j]
            piece_end = min(a_off + a_len, d_off + d_len)
            if d_flags & STATE_DIRTY:
                if not a_flags & STATE_ZERO:
                    add(at, piece_end - at, "data")
                elif dirty_ctx:
                    add(at, piece_end - at, "zero")
            at = piece_end
            if at >= a_off + a_len:
                i += 1
            if at >= d_off + d_len:
                j += 1
        pos = end
    return out


# ---- one disk ------------------------------------------------------------------


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *args], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Failure(f"qemu-img {' '.join(args)}: {r.stderr.strip()}")


def pull_disk(disk, out_dir, new, base):
    """Pulls one disk of the session into DIR/NODE.NEW.qcow2 (over
    NODE.BASE.qcow2 for an incremental). Returns its summary."""
    node, uri, size = disk["node"], disk["uri"], disk["size"]
    final = os.path.join(out_dir, f"{node}.{new}.qcow2")
    part = final + ".part"
    dirty_ctx = DIRTY_PREFIX + disk["bitmap"] if base else None

    src = nbd.NBD()
    src.add_meta_context(BASE_ALLOCATION)
    if dirty_ctx:
        src.add_meta_context(dirty_ctx)
    src.connect_uri(uri)
    for c in [BASE_ALLOCATION] + ([dirty_ctx] if dirty_ctx else []):
        if not src.can_meta_context(c):
            raise Failure(f"{uri} does not offer the meta context {c}")
    if src.get_size() != size:
        raise Failure(f"{uri}: size {src.get_size()}, the session said {size}")
    todo = plan(src, size, dirty_ctx)

    if base:
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"{node}.{base}.qcow2",
                 "-F", "qcow2", part, str(size))
    else:
        qemu_img("create", "-q", "-f", "qcow2", part, str(size))
    chunk = min(COPY_CHUNK, src.get_block_size(nbd.SIZE_MAXIMUM) or COPY_CHUNK)
    pulled = zeroed = data_extents = zero_extents = 0
    try:
        dst = nbd.NBD()
        # libnbd runs qemu-nbd on a socket of its own and reaps it on close.
        dst.connect_systemd_socket_activation(
            ["qemu-nbd", "-f", "qcow2", "--cache=writeback", part])
        for off, length, kind in todo:
            if kind == "data":
                data_extents += 1
                for o in range(off, off + length, chunk):
                    checked()
                    n = min(chunk, off + length - o)
                    dst.pwrite(src.pread(n, o), o)
                    pulled += n
            else:
                zero_extents += 1
                for o in range(off, off + length, ZERO_CHUNK):
                    checked()
                    dst.zero(min(ZERO_CHUNK, off + length - o), o)
                zeroed += length
        dst.flush()
        dst.shutdown()
        del dst  # closes the handle: waits for qemu-nbd to exit
        src.shutdown()
        os.rename(part, final)
    except BaseException:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
    return {
        "node": node, "image": final, "size": size,
        "backing": f"{node}.{base}.qcow2" if base else None,
        "dirty-bytes": disk.get("dirty-bytes") if base else None,
        "pulled": pulled, "data-extents": data_extents,
        "zeroed": zeroed, "zero-extents": zero_extents,
        "skipped": size - pulled - zeroed,
    }


def mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def count(n, what):
    return f"{n} {what}" + ("" if n == 1 else "s")


def describe(s, base, new):
    if base:
        what = (f"incremental {base} -> {new}, over {s['backing']}; "
                f"dirty {mib(s['dirty-bytes'])}")
    else:
        what = f"full backup {new}"
    return (f"{s['node']}: {what} -> {s['image']}: pulled {s['pulled']} bytes "
            f"({mib(s['pulled'])}) in {count(s['data-extents'], 'data extent')}, "
            f"zeroed {s['zeroed']} bytes in {count(s['zero-extents'], 'extent')}, "
            f"skipped {mib(s['skipped'])} of {mib(s['size'])}")


# ---- the session ---------------------------------------------------------------


def hook(cmd, what):
    if not cmd:
        return True
    sys.stdout.flush()
    r = subprocess.run(cmd, shell=True)
    if r.returncode != 0:
        print(f"vendor-pull: {what} hook exited with {r.returncode}", file=sys.stderr)
    return r.returncode == 0


def run(a):
    os.makedirs(a.out, exist_ok=True)
    for node in a.disk:
        target = os.path.join(a.out, f"{node}.{a.checkpoint}.qcow2")
        if os.path.exists(target):
            raise Failure(f"{target} already exists")
        if a.incremental:
            prev = os.path.join(a.out, f"{node}.{a.incremental}.qcow2")
            if not os.path.exists(prev):
                raise Failure(f"no backup of {node} at checkpoint {a.incremental}: "
                              f"{prev} is missing")
    qmp = Qmp(a.qmp)
    disks = []
    for node in a.disk:
        d = {"node": node}
        if a.scratch_dir:
            d["scratch"] = os.path.join(os.path.abspath(a.scratch_dir),
                                        f"{a.id}-{node}.scratch.qcow2")
        disks.append(d)
    args = {"id": a.id, "disks": disks, "checkpoint": a.checkpoint}
    if a.incremental:
        args["incremental"] = a.incremental
    checked()
    if not hook(a.freeze, "freeze"):
        raise Failure("the freeze hook failed: no backup begun")
    began = ok = False
    summaries = []
    try:
        try:
            reply = qmp.execute("x-tidemark-backup-begin", args)
            began = True
        finally:
            hook(a.thaw, "thaw")
        for disk in reply["disks"]:
            checked()
            summaries.append(pull_disk(disk, a.out, a.checkpoint, a.incremental))
        checked()
        ok = True
    finally:
        # Also on an exception: the session must go, and without success
        # the new checkpoint with it. Images of this run go too.
        try:
            if began:
                qmp.execute("x-tidemark-backup-end", {"id": a.id, "success": ok})
        except Failure as e:
            if ok:
                raise
            print(f"vendor-pull: {e}", file=sys.stderr)
        finally:
            if not ok:
                for s in summaries:
                    try:
                        os.unlink(s["image"])
                    except OSError:
                        pass
            qmp.close()
    total = sum(s["pulled"] for s in summaries)
    if a.json:
        print(json.dumps({"checkpoint": a.checkpoint, "incremental": a.incremental,
                          "disks": summaries, "pulled": total}))
    else:
        for s in summaries:
            print(describe(s, a.incremental, a.checkpoint))
        print(f"pulled {total} bytes ({mib(total)}) from {len(summaries)} disk(s); "
              f"checkpoint {a.checkpoint}")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(
        description="Pull a full or incremental backup from a tidemark "
                    "pull-backup session (x-tidemark-backup-begin/-end).")
    p.add_argument("--qmp", required=True, help="tidemark's QMP unix socket")
    p.add_argument("--disk", required=True, action="append",
                   help="a disk's node name (repeatable: one session for all)")
    p.add_argument("--out", required=True, help="backup directory")
    p.add_argument("--incremental", metavar="CHECKPOINT",
                   help="pull only what changed since CHECKPOINT (whose backup "
                        "DIR/NODE.CHECKPOINT.qcow2 must exist)")
    p.add_argument("--checkpoint", required=True, metavar="NEW",
                   help="the checkpoint this backup creates; names its images")
    p.add_argument("--id", default="vendor-pull", help="the session id")
    p.add_argument("--scratch-dir", help="where the session's scratch images go "
                                         "(default: tidemark's temp directory)")
    p.add_argument("--freeze", metavar="CMD", help="shell command run just before the begin")
    p.add_argument("--thaw", metavar="CMD", help="shell command run just after the begin")
    p.add_argument("--json", action="store_true", help="the summary as one JSON line")
    a = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        run(a)
    except (Failure, nbd.Error, OSError) as e:
        print(f"vendor-pull: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a surprise from the server, or a bug here
        print(f"vendor-pull: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
