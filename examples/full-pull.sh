#!/usr/bin/env bash
# A full backup pulled with stock tools: serve a disk with tidemark, look at
# it with nbdinfo, copy it with nbdcopy (sparse: holes stay holes), check the
# copy with qemu-img compare, stop the server.
#
#   examples/full-pull.sh            (builds tidemark; TIDEMARK=path uses that binary)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=examples/lib.sh
. "$repo/examples/lib.sh"
tidemark=$(tidemark_binary)
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

# A 256 MiB disk with some data in it.
truncate -s 256M "$work/disk.raw"
qemu-io -f raw -c 'write -P 0xaa 1M 4M' -c 'write -P 0xbb 100M 64k' "$work/disk.raw" >/dev/null

"$tidemark" serve --read-only --socket "$work/nbd.sock" --export-name disk0 \
  --description "example disk" "$work/disk.raw" 2>"$work/server.log" &
server=$!
for _ in $(seq 100); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///disk0?socket=$work/nbd.sock"

echo "== what the server offers"
nbdinfo --list "nbd+unix://?socket=$work/nbd.sock"
echo "== where the data is (base:allocation)"
nbdinfo --map "$uri"
echo "== pull it"
nbdcopy "$uri" "$work/backup.raw"
qemu-img compare -f raw -F raw "$work/disk.raw" "$work/backup.raw"
du -h --apparent-size "$work/backup.raw"; du -h "$work/backup.raw"

kill -TERM "$server"; wait "$server"
echo "server exited cleanly; socket removed: $([ -e "$work/nbd.sock" ] && echo no || echo yes)"
