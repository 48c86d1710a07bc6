#!/usr/bin/python3
"""Reads replayed power-cut images for tests/bitmap_power_cut.rs, through
qemu-nbd (qemu's own reading of the qcow2 and of its bitmaps, not
tidemark's).

    /usr/bin/python3 powercut_reader.py

One request per line on stdin, one JSON reply per line on stdout:

  <- {"image": PATH, "bitmaps": [NAME, ...], "ranges": [[OFF, LEN], ...],
      "out": PATH}
  -> {"ok": true, "size": SIZE, "dirty": {NAME: [[OFF, LEN], ...], ...}}
     or {"ok": false, "error": MESSAGE}

For each request, qemu-nbd is started on the image (read-only, every
bitmap exported with -B) by libnbd's systemd socket activation, so it
lives exactly as long as the connection. "dirty" lists each bitmap's dirty
extents (adjacent ones joined). The guest data of "ranges" is written to
the file "out", the ranges one after the other in the order given. A
bitmap qemu will not export (missing, or inconsistent: left in use) makes
qemu-nbd fail: the reply is then an error, and qemu-nbd's message is on
this script's stderr. EOF on stdin ends the script.
"""

import json
import sys

import nbd

DIRTY = 1
MAX_STATUS = 1 << 30
MAX_READ = 4 << 20


def dirty_extents(h, context, size):
    """The dirty extents of `context` over the whole disk, joined."""
    out = []
    off = 0
    while off < size:
        got = []

        def extent(metacontext, offset, entries, err):
            if metacontext == context:
                got.append((offset, list(entries)))
            return 0

        h.block_status(min(size - off, MAX_STATUS), off, extent)
        if not got:
            raise RuntimeError(f"no extents of {context} at {off}")
        at = off
        for _offset, entries in got:
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                length = min(length, size - at)
                if flags & DIRTY:
                    if out and out[-1][0] + out[-1][1] == at:
                        out[-1][1] += length
                    else:
                        out.append([at, length])
                at += length
        if at <= off:
            raise RuntimeError(f"block status of {context} made no progress at {off}")
        off = at
    return out


def inspect(req):
    names = req["bitmaps"]
    h = nbd.NBD()
    for n in names:
        h.add_meta_context("qemu:dirty-bitmap:" + n)
    argv = ["qemu-nbd", "-r", "-f", "qcow2"]
    for n in names:
        argv += ["-B", n]
    argv.append(req["image"])
    try:
        h.connect_systemd_socket_activation(argv)
        size = h.get_size()
        dirty = {}
        for n in names:
            ctx = "qemu:dirty-bitmap:" + n
            if not h.can_meta_context(ctx):
                return {"ok": False, "error": f"qemu-nbd does not offer {ctx}"}
            dirty[n] = dirty_extents(h, ctx, size)
        with open(req["out"], "wb") as f:
            for off, length in req["ranges"]:
                done = 0
                while done < length:
                    n = min(length - done, MAX_READ)
                    f.write(h.pread(n, off + done))
                    done += n
        h.shutdown()
        return {"ok": True, "size": size, "dirty": dirty}
    finally:
        # Closing the handle ends (and reaps) qemu-nbd.
        del h


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            res = inspect(req)
        except (nbd.Error, RuntimeError, OSError) as e:
            res = {"ok": False, "error": str(e)}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
