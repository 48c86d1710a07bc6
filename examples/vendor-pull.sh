#!/usr/bin/env bash
# A backup vendor's agent (examples/vendor-pull.py: Python, libnbd and a
# dozen lines of QMP) against tidemark's pull-backup sessions:
#  1. `tidemark daemon` serves a qcow2 disk through a writable NBD export;
#     a "guest" writes to it (and, the same, to expected.raw);
#  2. a full backup: one x-tidemark-backup-begin (checkpoint c1), the
#     allocated extents only, into vda.c1.qcow2, then x-tidemark-backup-end;
#  3. the guest writes more; an incremental from c1 (checkpoint c2) pulls
#     only the dirty extents into vda.c2.qcow2, an overlay over vda.c1.qcow2;
#     the guest keeps writing afterwards;
#  4. after quit: the chain vda.c2.qcow2 -> vda.c1.qcow2 equals the disk as it
#     was at the second begin, vda.c1.qcow2 the disk at the first, and the
#     disk holds every write.
#
#   examples/vendor-pull.sh   (builds tidemark; TIDEMARK=path uses that binary)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=examples/lib.sh
. "$repo/examples/lib.sh"
tidemark=$(tidemark_binary)
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"' EXIT

uri="nbd+unix:///vda?socket=$work/nbd.sock"
# qmp COMMAND [ARGS-JSON]: one command on the monitor, its return printed.
qmp() {
  local json_args=${2:-'{}'}
  /usr/bin/python3 - "$work/qmp.sock" "$1" "$json_args" <<'EOF'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()                                    # the greeting
for name, args in (("qmp_capabilities", {}), (sys.argv[2], json.loads(sys.argv[3]))):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while "event" in (m := json.loads(f.readline())):
        pass
    if "error" in m:
        sys.exit(f"qmp: {name}: {m['error']['desc']}")
print(f"{sys.argv[2]} -> {json.dumps(m['return'])}")
EOF
}
pull() { /usr/bin/python3 "$repo/examples/vendor-pull.py" --qmp "$work/qmp.sock" \
  --disk vda --out "$work/backups" --scratch-dir "$work" "$@"; }

echo "== 1. a 64 MiB qcow2 disk served by tidemark daemon; the guest writes"
qemu-img create -q -f qcow2 "$work/vda.qcow2" 64M
truncate -s 64M "$work/expected.raw"
"$tidemark" daemon \
  --chardev "socket,id=qmp0,path=$work/qmp.sock,server=on,wait=off" --monitor chardev=qmp0 \
  --blockdev "driver=file,node-name=vda-file,filename=$work/vda.qcow2" \
  --blockdev driver=qcow2,node-name=vda,file=vda-file \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=guest-vda,node-name=vda,name=vda,writable=on \
  --pidfile "$work/daemon.pid" >"$work/daemon.log" 2>&1 &
server=$!
for _ in $(seq 100); do [ -s "$work/daemon.pid" ] && break; sleep 0.1; done
[ -s "$work/daemon.pid" ] || { echo "daemon did not start" >&2; cat "$work/daemon.log" >&2; exit 1; }
guest 'write -P 0x11 0 8M' 'write -P 0x22 20M 3M' 'write -P 0x33 40M 64k'

echo "== 2. full backup, checkpoint c1"
pull --checkpoint c1
cp --sparse=always "$work/expected.raw" "$work/at-c1.raw"

echo "== 3. the guest writes; incremental from c1, checkpoint c2"
guest 'write -P 0x44 1M 128k' 'write -z 20M 1M' 'write -P 0x55 50M 300k'
cp --sparse=always "$work/expected.raw" "$work/at-c2.raw"
pull --incremental c1 --checkpoint c2
guest 'write -P 0x66 2M 1M'   # after the backup: not in it
qmp x-tidemark-query-checkpoints '{"node": "vda"}'
qmp x-tidemark-query-backups

echo "== 4. quit, then check the backups"
qmp quit
wait "$server"
server=
qemu-img info --backing-chain "$work/backups/vda.c2.qcow2" | grep -E '^(image|backing file|disk size):'
for f in vda.c1.qcow2 vda.c2.qcow2; do qemu-img check -q "$work/backups/$f" && echo "  $f: check clean"; done
echo -n "  c1 (full) against the disk at the first begin: "
qemu-img compare -f qcow2 -F raw "$work/backups/vda.c1.qcow2" "$work/at-c1.raw"
echo -n "  c2 over c1 against the disk at the second begin: "
qemu-img compare -f qcow2 -F raw "$work/backups/vda.c2.qcow2" "$work/at-c2.raw"
echo -n "  the disk against every write: "
qemu-img compare -f qcow2 -F raw "$work/vda.qcow2" "$work/expected.raw"
