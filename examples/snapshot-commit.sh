#!/usr/bin/env bash
# A live snapshot and an active commit, over QMP, while a "guest" writes
# through an NBD export:
#  1. `tidemark daemon` (qemu-storage-daemon's command line) serves a qcow2
#     disk over NBD; the guest writes to it;
#  2. blockdev-snapshot-sync puts a new qcow2 overlay on top: the export moves
#     to it, so the next writes land in the overlay and the disk stays as it
#     was at the snapshot (qemu-img info shows the chain);
#  3. block-commit of the active layer copies the overlay back into the disk;
#     the job says BLOCK_JOB_READY once both are in sync, keeps mirroring the
#     guest's writes, and job-complete pivots the export back onto the disk;
#  4. after quit, the disk alone holds every write: qemu-img check is clean
#     and qemu-img compare finds it identical to a raw file that got the same
#     writes all along.
#
#   examples/snapshot-commit.sh         (builds tidemark; TIDEMARK=path uses that binary)
#   examples/snapshot-commit.sh --qsd   (the same with qemu-storage-daemon; or EXAMPLE_DAEMON=qsd)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=examples/lib.sh
. "$repo/examples/lib.sh"
daemon=${EXAMPLE_DAEMON:-tidemark}
[ "${1:-}" = --qsd ] && daemon=qsd
case $daemon in
qsd | qemu-storage-daemon) daemon_cmd=(qemu-storage-daemon) ;;
tidemark) daemon_cmd=("$(tidemark_binary)" daemon) ;;
*) echo "EXAMPLE_DAEMON must be tidemark or qsd" >&2; exit 2 ;;
esac
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"' EXIT

# qmp [COMMAND ARGS-JSON | --wait EVENT]...: one QMP connection, steps in
# order; prints each return value and each awaited event. A QMP error, a job
# that ends in error or is cancelled, or 60 s without an answer: exit 1.
qmp_py='
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(60)
s.connect(sys.argv[1])
f = s.makefile("rw")
def msg():
    line = f.readline()
    if not line:
        sys.exit("qmp: the monitor closed the connection")
    return json.loads(line)
queued = []
def call(name, args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        m = msg()
        if "event" in m:
            queued.append(m)
        elif "error" in m:
            sys.exit("qmp: %s: %s" % (name, m["error"]["desc"]))
        else:
            return m["return"]
msg()                                   # the greeting
call("qmp_capabilities", {})
argv = sys.argv[2:]
while argv:
    if argv[0] == "--wait":
        want, argv = argv[1], argv[2:]
        while True:
            m = queued.pop(0) if queued else msg()
            ev, data = m["event"], m.get("data", {})
            if ev in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR") or "error" in data:
                sys.exit("qmp: %s %s" % (ev, json.dumps(data)))
            if ev == want:
                keep = ("device", "len", "offset", "type")
                print(ev, json.dumps({k: data[k] for k in keep if k in data}))
                break
    else:
        name, args, argv = argv[0], json.loads(argv[1]), argv[2:]
        ret = call(name, args)
        print(name, "->", json.dumps(ret) if ret != {} else "ok")
'
qmp() { /usr/bin/python3 -c "$qmp_py" "$work/qmp.sock" "$@"; }

uri="nbd+unix:///disk0?socket=$work/nbd.sock"

echo "== 1. a 64 MiB qcow2 disk, served by ${daemon_cmd[*]}"
qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M
truncate -s 64M "$work/expected.raw"
"${daemon_cmd[@]}" \
  --chardev "socket,id=qmp0,path=$work/qmp.sock,server=on,wait=off" --monitor chardev=qmp0 \
  --blockdev "driver=file,node-name=disk-file,filename=$work/disk.qcow2" \
  --blockdev driver=qcow2,node-name=disk,file=disk-file \
  --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
  --export type=nbd,id=e0,node-name=disk,name=disk0,writable=on \
  >"$work/daemon.log" 2>&1 &
server=$!
for _ in $(seq 100); do nbdinfo --size "$uri" >/dev/null 2>&1 && break; sleep 0.1; done
nbdinfo --size "$uri" >/dev/null || { echo "daemon did not start" >&2; cat "$work/daemon.log" >&2; exit 1; }
guest 'write -P 0x11 0 8M' 'write -P 0x22 32M 4M'

echo "== 2. snapshot: a new overlay on top of the disk; the export follows it"
qmp blockdev-snapshot-sync "{\"node-name\": \"disk\", \"snapshot-file\": \"$work/overlay.qcow2\",
  \"snapshot-node-name\": \"overlay\", \"format\": \"qcow2\"}"
cp --sparse=always "$work/expected.raw" "$work/at-snapshot.raw"
qemu-img info -U --backing-chain "$work/overlay.qcow2" | grep -E '^(image|backing file|file format):'
guest 'write -P 0x33 4M 8M' 'write -z 33M 1M' 'write -P 0x44 100k 3k' 'write -P 0x55 60M 64k'
qemu-img compare -U -q -f qcow2 -F raw "$work/disk.qcow2" "$work/at-snapshot.raw"
echo "  the disk under the overlay still holds the snapshot: yes"

echo "== 3. active commit of the overlay into the disk"
qmp block-commit '{"job-id": "commit0", "device": "overlay"}' --wait BLOCK_JOB_READY
guest 'write -P 0x66 2M 1M' 'write -P 0x77 50M 512k'   # mirrored to both while READY
qmp job-complete '{"id": "commit0"}' --wait BLOCK_JOB_COMPLETED
guest 'write -P 0x88 40M 1M'                          # the export is on the disk again
qmp query-block-jobs '{}'

echo "== 4. quit, then check the disk alone"
qmp quit '{}'
wait "$server"
server=
qemu-img check "$work/disk.qcow2"
qemu-img compare -f qcow2 -F raw "$work/disk.qcow2" "$work/expected.raw"
