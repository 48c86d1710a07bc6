#!/usr/bin/env bash
# Run the same NBD load against tidemark, qemu-nbd and nbdkit (file plugin),
# one server at a time, on the same raw file, and print a markdown table with
# absolute figures and ratios to qemu-nbd.  Progress goes to stderr, the
# report to stdout.  See benches/README.md.
#
# Usage: benches/compare.sh            (from anywhere; builds tidemark first)
#
# Environment (all optional):
#   BENCH_SIZE=4G          size of the served raw file (sequential read size)
#   BENCH_WRITE_SIZE=$BENCH_SIZE  bytes nbdcopy writes into the export (<= BENCH_SIZE)
#   BENCH_RAND_SECS=10     seconds per random-I/O row
#   BENCH_QD=16            random-I/O queue depth (requests in flight)
#   BENCH_BS=4k            random-I/O request size
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists)
#   BENCH_SERVERS="tidemark qemu-nbd nbdkit"   which columns to run, in this order
#   BENCH_CACHE=warm       warm: read the file once before each server;
#                          drop: sync + drop the page cache before each server (root)
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (image, sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default target/release/tidemark)
#   TIDEMARK_BASE_BIN=path another tidemark build, run as server tidemark-base
#                          (add it to BENCH_SERVERS) for before/after rows
#   BENCH_NBDCOPY_OPTS=""  extra nbdcopy options for both sequential rows
#   BENCH_START_TIMEOUT=30 seconds a server gets to accept a connection
#   BENCH_OP_TIMEOUT=180   seconds any one nbdcopy may take before it counts as failed
#   BENCH_KEEP=1           keep the temp dir (server logs) instead of removing it

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

size_str=${BENCH_SIZE:-4G}
wsize_str=${BENCH_WRITE_SIZE:-$size_str}
rand_secs=${BENCH_RAND_SECS:-10}
qd=${BENCH_QD:-16}
bs_str=${BENCH_BS:-4k}
randio=${BENCH_RANDIO:-auto}
servers=${BENCH_SERVERS:-tidemark qemu-nbd nbdkit}
cache_mode=${BENCH_CACHE:-warm}
start_timeout=${BENCH_START_TIMEOUT:-30}
op_timeout=${BENCH_OP_TIMEOUT:-180}
nbdcopy_opts=${BENCH_NBDCOPY_OPTS:-}
tidemark_bin=${TIDEMARK_BIN:-$repo/target/release/tidemark}
py=/usr/bin/python3   # Debian's python has python3-libnbd; a pyenv python3 does not

# shellcheck source=benches/lib.sh
. "$here/lib.sh"

size=$(to_bytes "$size_str") || die "bad BENCH_SIZE: $size_str"
wsize=$(to_bytes "$wsize_str") || die "bad BENCH_WRITE_SIZE: $wsize_str"
bs=$(to_bytes "$bs_str") || die "bad BENCH_BS: $bs_str"
[[ $rand_secs =~ ^[0-9]+$ && $qd =~ ^[0-9]+$ ]] || die "BENCH_RAND_SECS and BENCH_QD must be integers"
((wsize <= size)) || die "BENCH_WRITE_SIZE ($wsize_str) must not exceed BENCH_SIZE ($size_str)"
((size >= bs)) || die "BENCH_SIZE too small"
[[ $cache_mode == warm || $cache_mode == drop ]] || die "BENCH_CACHE must be warm or drop"
if [[ $cache_mode == drop ]]; then
    [[ $(id -u) == 0 ]] || die "BENCH_CACHE=drop needs root"
    { sync && echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null ||
        die "cannot write /proc/sys/vm/drop_caches; use BENCH_CACHE=warm"
fi
for t in nbdcopy nbdinfo numfmt timeout; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install libnbd-bin coreutils)"
done

select_randio

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-bench.XXXXXX") || die "mktemp failed"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

img=$tmp/disk.raw
src=$tmp/source.raw

# ---- tidemark build ------------------------------------------------------

declare -A note    # per-server reason for an n/a column
build_tidemark

log "creating $size_str image and $wsize_str write source in $tmp"
fill "$img" "$size"
fill "$src" "$wsize"
rm -f "$tmp/chunk"
sync "$img" "$src"

# ---- helpers -------------------------------------------------------------

prepare_cache() {
    if [[ $cache_mode == drop ]]; then
        sync && echo 3 >/proc/sys/vm/drop_caches
    else
        sync "$img" "$src"   # write back the previous server's dirty pages, untimed
        cat "$img" "$src" >/dev/null
    fi
}

server_cmd() { # server_cmd NAME SOCKET: sets the cmd array
    case $1 in
    tidemark | tidemark-base) cmd=("$(tidemark_of "$1")" serve --max-connections 16 --socket "$2" --export-name '' --format raw "$img") ;;
    # qemu-nbd's defaults, spelled out: write-back host cache, thread-pool AIO,
    # no zero detection, discard ignored.  --shared=16 so nbdcopy's and the
    # probes' connections are all accepted; --persistent keeps it up between loads.
    qemu-nbd) cmd=(qemu-nbd -f raw --cache=writeback --aio=threads --shared=16 --persistent -k "$2" "$img") ;;
    nbdkit) cmd=(nbdkit --foreground --unix "$2" file "$img") ;;
    *) die "unknown server $1" ;;
    esac
}

# Each load sets v to one number, or fails.
seq_read() {
    local t0=$EPOCHREALTIME
    # shellcheck disable=SC2086
    run "$op_timeout" nbdcopy $nbdcopy_opts "$uri" null: || return 1
    v=$(mibps "$size" "$t0" "$EPOCHREALTIME")
}

seq_write() {
    local t0=$EPOCHREALTIME
    # shellcheck disable=SC2086
    run "$op_timeout" nbdcopy $nbdcopy_opts "$src" "$uri" || return 1
    v=$(mibps "$wsize" "$t0" "$EPOCHREALTIME")
}

# ---- the runs ------------------------------------------------------------

rows=(seq_read seq_write rand_read rand_write rss)
declare -A label=(
    [seq_read]="sequential read, nbdcopy → null: (MiB/s)"
    [seq_write]="sequential write, nbdcopy file → export (MiB/s)"
    [rand_read]="$bs_str random read, QD $qd (IOPS)"
    [rand_write]="$bs_str random write, QD $qd (IOPS)"
    [rss]="peak RSS, VmHWM (MiB, lower is better)"
)
declare -A res      # res[server,row]
declare -A mconn    # can_multi_conn as the server advertises it

for s in $servers; do
    [[ $s == tidemark && -n ${note[tidemark]:-} ]] && { log "tidemark: skipped (${note[tidemark]})"; continue; }
    log "$s: preparing page cache ($cache_mode)"
    prepare_cache
    log "$s: starting"
    start_server "$s" || { log "$s: ${note[$s]}"; continue; }
    mconn[$s]=$(nbdinfo --can multi-conn "$uri" >/dev/null 2>&1 && echo yes || echo no)
    for row in seq_read seq_write rand_read rand_write; do
        log "$s: $row"
        rc=0 v=
        case $row in
        seq_read) seq_read || rc=1 ;;
        seq_write) seq_write || rc=1 ;;
        rand_read) rand_io read || rc=1 ;;
        rand_write) rand_io write || rc=1 ;;
        esac
        if [[ $rc == 0 && -n $v ]]; then
            res[$s,$row]=$v
            log "$s: $row = $v"
        else
            log "$s: $row failed"
            note[$s]="${note[$s]:+${note[$s]}; }$row failed"
            kill -0 "$srv_pid" 2>/dev/null || { note[$s]+=" (server died)"; break; }
        fi
    done
    if kill -0 "$srv_pid" 2>/dev/null; then
        res[$s,rss]=$(peak_rss_mib) || unset "res[$s,rss]"
    fi
    log "$s: stopping"
    stop_server
done

# ---- report --------------------------------------------------------------

commit=$(checkout_id)

cat <<EOF
## tidemark vs qemu-nbd vs nbdkit

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC')
- image: $(numfmt --to=iec "$size") raw, fully allocated random data, on $(df --output=fstype "$tmp" | tail -n 1); write source $(numfmt --to=iec "$wsize")
- page cache: $([[ $cache_mode == warm ]] && echo "pre-warmed (sync, then image and write source read once) before each server" || echo "sync + drop_caches before each server")
- servers run one at a time, in this order: $servers; each on a fresh unix socket
- tidemark ($commit): \`target/release/tidemark serve --max-connections 16 --socket S --export-name '' --format raw IMG\`
- $(ver qemu-nbd --version): \`qemu-nbd -f raw --cache=writeback --aio=threads --shared=16 --persistent -k S IMG\`
- $(ver nbdkit --version): \`nbdkit --foreground --unix S file IMG\`
- sequential: $(ver nbdcopy --version), \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} URI null:\` and \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} SRC URI\` (several connections only if the server advertises multi-conn)
- random: $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine"; else echo "benches/randio.py (python3-libnbd aio)"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s per row, whole export

| load | tidemark | qemu-nbd | nbdkit | tidemark / qemu-nbd | nbdkit / qemu-nbd |
|---|---:|---:|---:|---:|---:|
EOF
for row in "${rows[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s |\n' "${label[$row]}" \
        "$(cell tidemark "$row")" "$(cell qemu-nbd "$row")" "$(cell nbdkit "$row")" \
        "$(ratio tidemark "$row")" "$(ratio nbdkit "$row")"
done
base_table "${rows[@]}"
echo
printf -- '- can_multi_conn:'
for s in tidemark qemu-nbd nbdkit; do printf ' %s=%s' "$s" "${mconn[$s]:-n/a}"; done
echo
for s in tidemark qemu-nbd nbdkit; do
    [[ -n ${note[$s]:-} ]] && echo "- $s: ${note[$s]}"
    [[ " $servers " != *" $s "* ]] && echo "- $s: not run (BENCH_SERVERS)"
done
exit 0
