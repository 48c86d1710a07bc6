#!/bin/sh
# An incremental-backup script written for qemu-storage-daemon. The test
# runs it unchanged with DAEMON="qemu-storage-daemon" and with
# DAEMON="tidemark daemon"; the outputs must be equal.
# Usage: incremental_backup.sh DIR   (DAEMON and QMP_SEND in the environment)
set -eu
DIR=$1
qmp() { /usr/bin/python3 "$QMP_SEND" "$DIR/qmp.sock" "$@"; }

truncate -s 8M "$DIR/disk.img"

$DAEMON \
    --blockdev driver=file,node-name=disk-file,filename="$DIR/disk.img" \
    --blockdev '{"driver": "raw", "node-name": "disk", "file": "disk-file"}' \
    --nbd-server addr.type=unix,addr.path="$DIR/nbd.sock",max-connections=4 \
    --export type=nbd,id=vm,node-name=disk,name=vm,writable=on \
    --chardev socket,id=mon0,path="$DIR/qmp.sock",server=on,wait=off \
    --monitor chardev=mon0 \
    --pidfile "$DIR/daemon.pid" \
    --daemonize

VM="nbd+unix:///vm?socket=$DIR/nbd.sock"
qemu-io -f raw -c 'write -P 0x11 0 1M' "$VM" >/dev/null

# Full backup point: start tracking.
qmp '{"execute": "block-dirty-bitmap-add", "arguments": {"node": "disk", "name": "inc0"}}'
qemu-io -f raw -c 'write -P 0x22 2M 64k' -c 'write -P 0x33 5M 4k' "$VM" >/dev/null

# Incremental backup: freeze inc0, start inc1, export inc0 read-only.
qmp '{"execute": "transaction", "arguments": {"actions": [
        {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "inc0"}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": "inc1"}}]}}' \
    '{"execute": "block-export-add", "arguments": {"type": "nbd", "id": "backup", "node-name": "disk",
        "name": "backup", "bitmaps": ["inc0"]}}'
nbdinfo --map=qemu:dirty-bitmap:inc0 "nbd+unix:///backup?socket=$DIR/nbd.sock"
qemu-img convert -f raw -O raw "nbd+unix:///backup?socket=$DIR/nbd.sock" "$DIR/copy.img"
sha256sum < "$DIR/copy.img"
qemu-io -f raw -c 'write -P 0x44 7M 4k' "$VM" >/dev/null
qmp '{"execute": "block-export-del", "arguments": {"id": "backup"}}' \
    '{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk", "name": "inc0"}}' \
    '{"execute": "query-block-exports"}' \
    '{"execute": "x-debug-block-dirty-bitmap-sha256", "arguments": {"node": "disk", "name": "inc1"}}' \
    '{"execute": "quit"}'
test ! -S "$DIR/qmp.sock" || echo "monitor socket left behind"
