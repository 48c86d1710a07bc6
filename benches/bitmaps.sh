#!/usr/bin/env bash
# Issue 4 benchmark: persistent qcow2 bitmaps, tidemark against qemu-nbd.
#
#   benches/bitmaps.sh            # progress on stderr, a markdown table on stdout
#
# The image: a 1 TiB qcow2 (64 KiB clusters) with a 64 KiB bitmap b0 holding
# ~100k scattered dirty extents, made by qemu-io write-zeroes (which dirty the
# bitmap without allocating data). Rows, each the best of BENCH_REPS runs:
#   map      `nbdinfo --map=qemu:dirty-bitmap:b0` against a read-only export
#            with -B b0 (the two outputs must be identical);
#   load ro  server start until it answers NBD (opens the image, loads b0);
#   load rw  the same, read-write (also marks b0 in use on disk);
#   store    SIGTERM until exit on the read-write server (stores b0 again).
# Ratio = qemu-nbd time / tidemark time: above 1x, tidemark is faster.
#
# qemu-nbd runs with --persistent (else it exits after the readiness probe).
# Knobs: BENCH_EXTENTS (100000), BENCH_REPS (3), BENCH_DIR ($TMPDIR or
# /var/tmp), BENCH_NO_BUILD / TIDEMARK_BIN, BENCH_KEEP (keep the temp dir).
set -euo pipefail

EXTENTS=${BENCH_EXTENTS:-100000}
REPS=${BENCH_REPS:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet) >&2
fi
BIN=${TIDEMARK_BIN:-$ROOT/target/release/tidemark}
WORK=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-bitmaps.XXXXXX")
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then kill -9 "$SERVER_PID" 2>/dev/null || true; fi
    if [[ -z ${BENCH_KEEP:-} ]]; then rm -rf "$WORK"; else echo "kept $WORK" >&2; fi
}
trap cleanup EXIT

IMG=$WORK/big.qcow2
SOCK=$WORK/nbd.sock
URI="nbd+unix:///?socket=$SOCK"
now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc -l; }

echo "creating the 1 TiB image with $EXTENTS dirty extents..." >&2
qemu-img create -q -f qcow2 "$IMG" 1T
qemu-img bitmap --add -g 64k "$IMG" b0
# Granule-aligned extents of 1-4 granules at random granules (seeded).
awk -v n="$EXTENTS" 'BEGIN { srand(4); g = 65536; total = 16777216;
    for (i = 0; i < n; i++) {
        start = int(rand() * (total - 4)); len = 1 + int(rand() * 4);
        printf "write -z %.0f %.0f\n", start * g, len * g } }' > "$WORK/cmds"
qemu-io -f qcow2 "$IMG" < "$WORK/cmds" > /dev/null

start_server() { # kind mode(ro|rw)
    local ro=()
    [[ $2 == ro ]] && ro=(-r)
    rm -f "$SOCK"
    case $1 in
        tidemark) "$BIN" serve -f qcow2 "${ro[@]}" -B b0 -k "$SOCK" "$IMG" 2>"$WORK/server.log" & ;;
        qemu-nbd) qemu-nbd --persistent -f qcow2 "${ro[@]}" -B b0 -k "$SOCK" "$IMG" 2>"$WORK/server.log" & ;;
    esac
    SERVER_PID=$!
}

wait_ready() {
    local deadline=$((SECONDS + 120))
    until nbdinfo --size "$URI" >/dev/null 2>&1; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "server died:" >&2; cat "$WORK/server.log" >&2; exit 1
        fi
        if ((SECONDS > deadline)); then echo "server not ready" >&2; exit 1; fi
        sleep 0.005
    done
}

stop_server() { # sets STOP_SECS: from SIGTERM to exit (not in a subshell,
    local t0 t1  # which could not wait for the server)
    t0=$(now)
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
    t1=$(now)
    SERVER_PID=
    STOP_SECS=$(elapsed "$t0" "$t1")
}

min() { printf '%s\n' "$@" | sort -g | head -1; }

declare -A T
for kind in qemu-nbd tidemark; do
    maps=() loads_ro=() loads_rw=() stores=()
    for ((r = 0; r < REPS; r++)); do
        echo "$kind run $((r + 1))/$REPS..." >&2
        t0=$(now); start_server "$kind" ro; wait_ready; t1=$(now)
        loads_ro+=("$(elapsed "$t0" "$t1")")
        t0=$(now); nbdinfo --map=qemu:dirty-bitmap:b0 "$URI" > "$WORK/map.$kind"; t1=$(now)
        maps+=("$(elapsed "$t0" "$t1")")
        stop_server
        t0=$(now); start_server "$kind" rw; wait_ready; t1=$(now)
        loads_rw+=("$(elapsed "$t0" "$t1")")
        stop_server
        stores+=("$STOP_SECS")
    done
    T[$kind,map]=$(min "${maps[@]}")
    T[$kind,load_ro]=$(min "${loads_ro[@]}")
    T[$kind,load_rw]=$(min "${loads_rw[@]}")
    T[$kind,store]=$(min "${stores[@]}")
done

if ! cmp -s "$WORK/map.qemu-nbd" "$WORK/map.tidemark"; then
    echo "the maps differ!" >&2
    diff "$WORK/map.qemu-nbd" "$WORK/map.tidemark" | head >&2
    exit 1
fi
qemu-img check -q "$IMG" || { echo "qemu-img check failed" >&2; exit 1; }
dirty_extents=$(grep -c ' 1 *dirty' "$WORK/map.tidemark" || true)

echo "| row ($dirty_extents dirty extents, 1 TiB, 64 KiB) | qemu-nbd s | tidemark s | ratio |"
echo "|---|---|---|---|"
for row in map load_ro load_rw store; do
    q=${T[qemu-nbd,$row]} t=${T[tidemark,$row]}
    printf '| %s | %.3f | %.3f | %.2fx |\n' "$row" "$q" "$t" "$(echo "$q / $t" | bc -l)"
done
