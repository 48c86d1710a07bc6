#!/usr/bin/env bash
# Run the same NBD load against tidemark, qemu-nbd and nbdkit (file plugin),
# one server at a time, on the same raw file (and a sparse one for the sparse
# pull), and print a markdown table with absolute figures and ratios to
# qemu-nbd, then the raw rows of issue 13's table.  Progress goes to stderr,
# the report to stdout.  See benches/README.md.
#
# Usage: benches/compare.sh            (from anywhere; builds tidemark first)
#
# Environment (all optional):
#   BENCH_SIZE=4G          size of the served raw file (sequential read size)
#   BENCH_WRITE_SIZE=$BENCH_SIZE  bytes nbdcopy writes into the export (<= BENCH_SIZE)
#   BENCH_RAND_SECS=10     seconds per random-I/O row
#   BENCH_QD=16            random-I/O queue depth (requests in flight)
#   BENCH_BS=4k            random-I/O request size
#   BENCH_SPARSE_SIZE=64G  size of the sparse raw file of the sparse-pull row
#   BENCH_SPARSE_EVERY=100 it has one 64 KiB block written in every
#                          BENCH_SPARSE_EVERY (100: 1%, at a seeded random place)
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists)
#   BENCH_SERVERS="tidemark qemu-nbd nbdkit"   which columns to run, in this order
#   BENCH_CACHE=warm       warm: read the file once before each server;
#                          drop: sync + drop the page cache before each server (root)
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (image, sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default ${CARGO_TARGET_DIR:-target}/release/tidemark)
#   TIDEMARK_BASE_BIN=path another tidemark build, run as server tidemark-base
#                          (add it to BENCH_SERVERS) for before/after rows
#   BENCH_NBDCOPY_OPTS=""  extra nbdcopy options for both sequential rows and
#                          the sparse pull (not the -C 1 / -C 2 pulls)
#   BENCH_START_TIMEOUT=30 seconds a server gets to accept a connection
#   BENCH_OP_TIMEOUT=180   seconds any one nbdcopy may take before it counts as failed
#   BENCH_BUILD_TIMEOUT=600 seconds the qemu-io writing the sparse file may take
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
sparse_size_str=${BENCH_SPARSE_SIZE:-64G}
sparse_every=${BENCH_SPARSE_EVERY:-100}
sparse_block=$((64 << 10))
servers=${BENCH_SERVERS:-tidemark qemu-nbd nbdkit}
cache_mode=${BENCH_CACHE:-warm}
start_timeout=${BENCH_START_TIMEOUT:-30}
op_timeout=${BENCH_OP_TIMEOUT:-180}
build_timeout=${BENCH_BUILD_TIMEOUT:-600}
nbdcopy_opts=${BENCH_NBDCOPY_OPTS:-}
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir=$repo/$target_dir   # cargo's is relative to the checkout
tidemark_bin=${TIDEMARK_BIN:-$target_dir/release/tidemark}
py=/usr/bin/python3   # Debian's python has python3-libnbd; a pyenv python3 does not

# shellcheck source=benches/lib.sh
. "$here/lib.sh"

size=$(to_bytes "$size_str") || die "bad BENCH_SIZE: $size_str"
wsize=$(to_bytes "$wsize_str") || die "bad BENCH_WRITE_SIZE: $wsize_str"
bs=$(to_bytes "$bs_str") || die "bad BENCH_BS: $bs_str"
sparse_size=$(to_bytes "$sparse_size_str") || die "bad BENCH_SPARSE_SIZE: $sparse_size_str"
[[ $sparse_every =~ ^[1-9][0-9]*$ ]] || die "BENCH_SPARSE_EVERY must be a positive integer"
((sparse_size % sparse_block == 0 && sparse_size / sparse_block >= sparse_every)) ||
    die "BENCH_SPARSE_SIZE must be a multiple of 64 KiB and hold at least BENCH_SPARSE_EVERY blocks"
[[ $rand_secs =~ ^[0-9]+$ && $qd =~ ^[0-9]+$ ]] || die "BENCH_RAND_SECS and BENCH_QD must be integers"
((wsize <= size)) || die "BENCH_WRITE_SIZE ($wsize_str) must not exceed BENCH_SIZE ($size_str)"
((size >= bs)) || die "BENCH_SIZE too small"
[[ $cache_mode == warm || $cache_mode == drop ]] || die "BENCH_CACHE must be warm or drop"
if [[ $cache_mode == drop ]]; then
    [[ $(id -u) == 0 ]] || die "BENCH_CACHE=drop needs root"
    { sync && echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null ||
        die "cannot write /proc/sys/vm/drop_caches; use BENCH_CACHE=warm"
fi
for t in nbdcopy nbdinfo numfmt timeout qemu-io; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install libnbd-bin coreutils qemu-utils)"
done

select_randio
clk_tck=$(getconf CLK_TCK) || die "getconf CLK_TCK failed"

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-bench.XXXXXX") || die "mktemp failed"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

img=$tmp/disk.raw
src=$tmp/source.raw
sparse=$tmp/sparse.raw   # BENCH_SPARSE_SIZE, one 64 KiB block in every BENCH_SPARSE_EVERY written
n_sparse=$((sparse_size / sparse_block / sparse_every))
need=$((size + wsize + n_sparse * sparse_block + (1 << 30)))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

# ---- tidemark build ------------------------------------------------------

declare -A note    # per-server reason for an n/a column
build_tidemark

log "creating $size_str image and $wsize_str write source in $tmp"
fill "$img" "$size"
fill "$src" "$wsize"
rm -f "$tmp/chunk"
log "creating $sparse_size_str sparse raw file ($n_sparse blocks of 64 KiB written, one in every $sparse_every)"
truncate -s "$sparse_size" "$sparse" || die "truncate $sparse failed"
scatter_cmds "$n_sparse" "$sparse_every" "$sparse_block" >"$tmp/sparse.cmds"
qemu_io "$tmp/sparse.cmds" -t unsafe -f raw "$sparse" || die "qemu-io on $sparse failed"
rm -f "$tmp/sparse.cmds"
sync "$img" "$src" "$sparse"
sparse_alloc=$(($(stat -c '%b * %B' "$sparse")))
((sparse_alloc >= n_sparse * sparse_block)) ||
    die "$sparse has $sparse_alloc bytes allocated, expected at least $((n_sparse * sparse_block))"

# ---- helpers -------------------------------------------------------------

# The sparse file's data is read through nbdcopy, which finds it with
# SEEK_DATA/SEEK_HOLE: reading its holes too would fill the page cache with
# gigabytes of zero pages that no row reads.
prepare_cache() {
    if [[ $cache_mode == drop ]]; then
        sync && echo 3 >/proc/sys/vm/drop_caches
    else
        sync "$img" "$src"   # write back the previous server's dirty pages, untimed
        cat "$img" "$src" >/dev/null
        nbdcopy "$sparse" null: || die "nbdcopy $sparse null: failed"
    fi
}

serve_img=$img
server_cmd() { # server_cmd NAME SOCKET: sets the cmd array; serves $serve_img
    case $1 in
    tidemark | tidemark-base) cmd=("$(tidemark_of "$1")" serve --max-connections 16 --socket "$2" --export-name '' --format raw "$serve_img") ;;
    # qemu-nbd's defaults, spelled out: write-back host cache, thread-pool AIO,
    # no zero detection, discard ignored.  --shared=16 so nbdcopy's and the
    # probes' connections are all accepted; --persistent keeps it up between loads.
    qemu-nbd) cmd=(qemu-nbd -f raw --cache=writeback --aio=threads --shared=16 --persistent -k "$2" "$serve_img") ;;
    nbdkit) cmd=(nbdkit --foreground --unix "$2" file "$serve_img") ;;
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

# pull_conns N: the whole export to null: with N connections (and N threads:
# nbdcopy uses at most one connection per thread, and its threads default to
# the number of cores); MiB/s in v, seconds in res[SERVER,pull_cN_secs]
pull_conns() {
    timed_pull -C "$1" -T "$1" || return 1
    res[$s,pull_c$1_secs]=$secs
    v=$(awk -v b="$size" -v t="$secs" 'BEGIN { printf "%.0f", b / 1048576 / t }')
}

# ---- the runs ------------------------------------------------------------

rows=(seq_read pull_c1 pull_c2 multi_conn seq_write rand_read rand_write rss sparse_secs sparse_cpu)
sparse_pct=$(awk -v e="$sparse_every" 'BEGIN { printf "%.3g%%", 100 / e }')
declare -A label=(
    [seq_read]="sequential read, nbdcopy → null: (MiB/s)"
    [pull_c1]="full pull, nbdcopy -C 1 → null: (MiB/s)"
    [pull_c2]="full pull, nbdcopy -C 2 -T 2 → null: (MiB/s)"
    [multi_conn]="multi-conn: pull with 2 connections vs 1, time(-C 1) / time(-C 2) (each server's own)"
    [seq_write]="sequential write, nbdcopy file → export (MiB/s)"
    [rand_read]="$bs_str random read, QD $qd (IOPS)"
    [rand_write]="$bs_str random write, QD $qd (IOPS)"
    [rss]="peak RSS, VmHWM (MiB, lower is better)"
    [sparse_secs]="sparse pull: $sparse_size_str with $sparse_pct allocated, nbdcopy → null: (s, lower is better)"
    [sparse_cpu]="sparse pull: server CPU, utime + stime (s, lower is better)"
)
# shellcheck disable=SC2034 # read by lib.sh's ratio_or_own
declare -A own=([multi_conn]=1)   # rows whose ratio cells are the server's own figure
declare -A res      # res[server,row]
declare -A mconn    # can_multi_conn as the server advertises it

for s in $servers; do
    [[ $s == tidemark && -n ${note[tidemark]:-} ]] && { log "tidemark: skipped (${note[tidemark]})"; continue; }
    log "$s: preparing page cache ($cache_mode)"
    prepare_cache
    log "$s: starting"
    start_server "$s" || { log "$s: ${note[$s]}"; continue; }
    mconn[$s]=$(nbdinfo --can multi-conn "$uri" >/dev/null 2>&1 && echo yes || echo no)
    for row in seq_read pull_c1 pull_c2 seq_write rand_read rand_write; do
        log "$s: $row"
        rc=0 v=
        case $row in
        seq_read) seq_read || rc=1 ;;
        pull_c1) pull_conns 1 || rc=1 ;;
        pull_c2) pull_conns 2 || rc=1 ;;
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
    a=${res[$s,pull_c1_secs]:-} b=${res[$s,pull_c2_secs]:-}
    [[ -n $a && -n $b ]] && res[$s,multi_conn]=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }')

    log "$s: serving the $sparse_size_str sparse file"
    serve_img=$sparse
    if start_server "$s" sparse; then
        log "$s: sparse pull"
        # shellcheck disable=SC2086
        if timed_pull $nbdcopy_opts; then
            res[$s,sparse_secs]=$secs res[$s,sparse_cpu]=$cpu
            log "$s: sparse pull: ${secs}s, server CPU ${cpu}s"
        else
            log "$s: sparse pull failed"
            note[$s]="${note[$s]:+${note[$s]}; }sparse pull failed"
        fi
        stop_server
    else
        log "$s: ${note[$s]}"
    fi
    serve_img=$img
done

# ---- report --------------------------------------------------------------

commit=$(checkout_id)

cat <<EOF
## tidemark vs qemu-nbd vs nbdkit

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC')
- image: $(numfmt --to=iec "$size") raw, fully allocated random data, on $(df --output=fstype "$tmp" | tail -n 1); write source $(numfmt --to=iec "$wsize")
- sparse pull: $(numfmt --to=iec "$sparse_size") raw sparse file, $n_sparse blocks of 64 KiB written (one at a seeded random place in every $sparse_every; $(numfmt --to=iec "$sparse_alloc") allocated), a fresh start of each server; \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} URI null:\` ${BENCH_PULL_REPS:-3} times in a row, the median; server CPU = utime + stime (all threads, /proc/PID/stat) read before and after each
- page cache: $([[ $cache_mode == warm ]] && echo "pre-warmed (sync, then image, write source and the sparse file's data read once) before each server" || echo "sync + drop_caches before each server")
- servers run one at a time, in this order: $servers; each on a fresh unix socket
- tidemark ($commit): \`target/release/tidemark serve --max-connections 16 --socket S --export-name '' --format raw IMG\`
- $(ver qemu-nbd --version): \`qemu-nbd -f raw --cache=writeback --aio=threads --shared=16 --persistent -k S IMG\`
- $(ver nbdkit --version): \`nbdkit --foreground --unix S file IMG\`
- sequential: $(ver nbdcopy --version), \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} URI null:\` and \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} SRC URI\` (several connections only if the server advertises multi-conn); full pulls \`nbdcopy -C 1 -T 1 URI null:\` and \`nbdcopy -C 2 -T 2 URI null:\` (each the median of ${BENCH_PULL_REPS:-3} in a row), right after the sequential read on the same server
- random: $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine"; else echo "benches/randio.py (python3-libnbd aio)"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s per row, whole export

| load | tidemark | qemu-nbd | nbdkit | tidemark / qemu-nbd | nbdkit / qemu-nbd |
|---|---:|---:|---:|---:|---:|
EOF
for row in "${rows[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s |\n' "${label[$row]}" \
        "$(cell tidemark "$row")" "$(cell qemu-nbd "$row")" "$(cell nbdkit "$row")" \
        "$(ratio_or_own tidemark "$row")" "$(ratio_or_own nbdkit "$row")"
done
base_table "${rows[@]}"
echo
echo "Ratios are against qemu-nbd: above 1x is better for MiB/s and IOPS, below 1x for seconds and MiB;"
echo "the multi-conn row's ratio cells are each server's own speed-up (its cell), as in issue 13's table."

# issue 13's raw rows, in its table's terms
cat <<EOF

### Issue 13, raw rows (tidemark / qemu-nbd; above 1x is better, except the sparse pull and RSS: below 1x is better)

| load | tidemark | nbdkit | goal |
|---|---:|---:|---:|
EOF
issue_row() { # issue_row LABEL ROW GOAL
    printf '| %s | %s | %s | %s |\n' "$1" "$(ratio_or_own tidemark "$2")" "$(ratio_or_own nbdkit "$2")" "$3"
}
issue_row "raw $bs_str random read, QD $qd" rand_read "keep"
issue_row "raw $bs_str random write, QD $qd" rand_write "≥ 3x"
issue_row "raw full pull, nbdcopy -C 1 to null" pull_c1 "≥ 1.5x"
qemu_own=$(ratio_or_own qemu-nbd multi_conn)
issue_row "multi-conn: raw pull with 2 connections vs 1 (each server's own; qemu-nbd's own: ${qemu_own% (own)})" multi_conn "≥ 1.4x"
issue_row "sparse pull: $sparse_size_str raw with $sparse_pct allocated, nbdcopy to null (time; below 1x is better)" sparse_secs "≤ 0.7x"
issue_row "… server CPU during that pull (below 1x is better)" sparse_cpu ""
issue_row "peak RSS after all loads, VmHWM (below 1x is better; the issue's row, a 4-connection qcow2 pull, is in qcow2.sh)" rss ""
echo
printf -- '- can_multi_conn:'
for s in tidemark qemu-nbd nbdkit; do printf ' %s=%s' "$s" "${mconn[$s]:-n/a}"; done
echo
for s in tidemark qemu-nbd nbdkit; do
    [[ -n ${note[$s]:-} ]] && echo "- $s: ${note[$s]}"
    [[ " $servers " != *" $s "* ]] && echo "- $s: not run (BENCH_SERVERS)"
done
exit 0
