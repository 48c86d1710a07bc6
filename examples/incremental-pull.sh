#!/usr/bin/env bash
# Incremental backup with a persistent dirty bitmap, using stock tools:
#  1. a qcow2 disk gets bitmap b0 (tidemark bitmap --add), then a full backup;
#  2. a "VM" writes through a writable export; b0 records the writes and is
#     stored in the image when the server stops (qemu-img info shows it);
#  3. the backup reads qemu:dirty-bitmap:b0 over NBD and copies only the
#     dirty extents onto the previous backup, which then equals the disk;
#  4. b0 is cleared, ready for the next increment.
#
#   examples/incremental-pull.sh   (builds tidemark; TIDEMARK=path uses that binary)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=examples/lib.sh
. "$repo/examples/lib.sh"
tidemark=$(tidemark_binary)
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"' EXIT

serve() { # serve [tidemark serve options...]: start, wait for the socket
  rm -f "$work/nbd.sock"
  "$tidemark" serve --socket "$work/nbd.sock" "$@" "$work/disk.qcow2" 2>>"$work/server.log" &
  server=$!
  for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && return; sleep 0.1; done
  echo "server did not start" >&2; cat "$work/server.log" >&2; exit 1
}
stop() { kill -TERM "$server"; wait "$server"; server=; }
uri="nbd+unix:///?socket=$work/nbd.sock"

echo "== 1. a disk with data, a bitmap, and a full backup"
"$tidemark" create -f qcow2 "$work/disk.qcow2" 256M
serve
qemu-io -f raw -c 'write -P 0x11 0 32M' "$uri" >/dev/null
stop
"$tidemark" bitmap --add "$work/disk.qcow2" b0
serve --read-only
nbdcopy "$uri" "$work/backup.raw"
stop

echo "== 2. the guest writes; b0 records"
serve
qemu-io -f raw -c 'write -P 0x22 1M 64k' -c 'write -P 0x33 100M 300k' -c 'write -z 8M 1M' "$uri" >/dev/null
stop
qemu-img info "$work/disk.qcow2" | sed -n '/bitmaps:/,/refcount/p'

echo "== 3. pull only what b0 says changed"
serve --read-only --bitmap b0
nbdinfo --map=qemu:dirty-bitmap:b0 "$uri"
python_copy='
import nbd, os, sys
uri, target = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.add_meta_context("qemu:dirty-bitmap:b0")
h.connect_uri(uri)
size, pos, dirty = h.get_size(), 0, []
while pos < size:
    got = []
    def cb(ctx, offset, entries, err):
        if ctx == "qemu:dirty-bitmap:b0":
            got.extend(entries)
    h.block_status(min(size - pos, 1 << 30), pos, cb)
    for i in range(0, len(got), 2):
        if got[i + 1] & 1:
            dirty.append((pos, got[i]))
        pos += got[i]
fd = os.open(target, os.O_WRONLY)
copied = 0
for off, length in dirty:
    for o in range(off, off + length, 1 << 20):
        n = min(1 << 20, off + length - o)
        os.pwrite(fd, h.pread(n, o), o)
        copied += n
os.close(fd)
print(f"copied {copied} bytes in {len(dirty)} dirty extents")
'
/usr/bin/python3 -c "$python_copy" "$uri" "$work/backup.raw"
stop
qemu-img compare -f qcow2 -F raw "$work/disk.qcow2" "$work/backup.raw"

echo "== 4. start the next increment"
"$tidemark" bitmap --clear "$work/disk.qcow2" b0
qemu-img check "$work/disk.qcow2" | head -1
