#!/usr/bin/env bash
# Run the same NBD load against tidemark and qemu-nbd, one server at a time, on
# the same qcow2 images (an overlay over a qcow2 backing, a 1 TiB sparse and
# a 1 TiB empty qcow2, and a 64 GiB one with 1% allocated for the sparse
# pull), and print a markdown table with absolute figures and ratios to
# qemu-nbd, then the qcow2 rows of issue 13's table.  Progress goes to
# stderr, the report to stdout.  See benches/README.md.  Shares its helpers
# with compare.sh (benches/lib.sh).
#
# Usage: benches/qcow2.sh              (from anywhere; builds tidemark first)
#
# Environment (all optional):
#   BENCH_SIZE=4G          virtual size of the chain (base + overlay); the
#                          sequential-read row reads all of it, all allocated
#   BENCH_WRITE_SIZE=2G    bytes nbdcopy writes into a fresh overlay (<= BENCH_SIZE)
#   BENCH_RAND_SECS=10     seconds per random-I/O row
#   BENCH_QD=16            random-I/O queue depth (requests in flight)
#   BENCH_BS=4k            random-I/O request size
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists)
#   BENCH_CLUSTER=64k      cluster size of every image
#   BENCH_MAP_SIZE=1T      virtual size of the sparse and the empty image
#   BENCH_MAP_EVERY=100    the sparse image has one cluster allocated in every
#                          BENCH_MAP_EVERY (at a seeded random place in each group)
#   BENCH_EMPTY_OPTS=""    extra qemu-img create options for the empty image,
#                          e.g. "-o preallocation=metadata" (every L2 table present)
#   BENCH_SPARSE_SIZE=64G  virtual size of the sparse-pull image
#   BENCH_SPARSE_EVERY=100 it has one cluster written in every BENCH_SPARSE_EVERY
#                          (100: 1%, at a seeded random place in each group)
#   BENCH_SERVERS="tidemark qemu-nbd"   which columns to run, in this order
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (images, sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default ${CARGO_TARGET_DIR:-target}/release/tidemark)
#   TIDEMARK_BASE_BIN=path another tidemark build, run as server tidemark-base
#                          (add it to BENCH_SERVERS) for before/after rows
#   BENCH_NBDCOPY_OPTS=""  extra nbdcopy options for both sequential rows and
#                          the sparse pull (not the -C 1 and -C 4 pulls)
#   BENCH_START_TIMEOUT=30 seconds a server gets to accept a connection
#   BENCH_OP_TIMEOUT=180   seconds any one nbdcopy / nbdinfo --map may take
#   BENCH_BUILD_TIMEOUT=600 seconds any one image-building step may take
#   BENCH_KEEP=1           keep the temp dir (images, server logs, maps)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

size_str=${BENCH_SIZE:-4G}
wsize_str=${BENCH_WRITE_SIZE:-2G}
rand_secs=${BENCH_RAND_SECS:-10}
qd=${BENCH_QD:-16}
bs_str=${BENCH_BS:-4k}
randio=${BENCH_RANDIO:-auto}
cluster_str=${BENCH_CLUSTER:-64k}
map_size_str=${BENCH_MAP_SIZE:-1T}
map_every=${BENCH_MAP_EVERY:-100}
empty_opts=${BENCH_EMPTY_OPTS:-}
spull_size_str=${BENCH_SPARSE_SIZE:-64G}
spull_every=${BENCH_SPARSE_EVERY:-100}
servers=${BENCH_SERVERS:-tidemark qemu-nbd}
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
cluster=$(to_bytes "$cluster_str") || die "bad BENCH_CLUSTER: $cluster_str"
map_size=$(to_bytes "$map_size_str") || die "bad BENCH_MAP_SIZE: $map_size_str"
spull_size=$(to_bytes "$spull_size_str") || die "bad BENCH_SPARSE_SIZE: $spull_size_str"
[[ $rand_secs =~ ^[0-9]+$ && $qd =~ ^[0-9]+$ ]] || die "BENCH_RAND_SECS and BENCH_QD must be integers"
[[ $map_every =~ ^[1-9][0-9]*$ ]] || die "BENCH_MAP_EVERY must be a positive integer"
((wsize <= size)) || die "BENCH_WRITE_SIZE ($wsize_str) must not exceed BENCH_SIZE ($size_str)"
((size >= 4 << 20 && size % (2 << 20) == 0)) || die "BENCH_SIZE must be a multiple of 2 MiB, at least 4 MiB"
((cluster >= 512 && cluster <= 2 << 20 && (cluster & (cluster - 1)) == 0)) ||
    die "BENCH_CLUSTER must be a power of two from 512 to 2M"
((map_size % cluster == 0 && map_size / cluster >= map_every)) || die "BENCH_MAP_SIZE too small or not a multiple of BENCH_CLUSTER"
[[ $spull_every =~ ^[1-9][0-9]*$ ]] || die "BENCH_SPARSE_EVERY must be a positive integer"
((spull_size % cluster == 0 && spull_size / cluster >= spull_every)) ||
    die "BENCH_SPARSE_SIZE too small or not a multiple of BENCH_CLUSTER"
for t in nbdcopy nbdinfo numfmt timeout qemu-img qemu-io jq; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install libnbd-bin qemu-utils coreutils jq)"
done
select_randio
clk_tck=$(getconf CLK_TCK) || die "getconf CLK_TCK failed"

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-qcow2-bench.XXXXXX") || die "mktemp failed"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

n_sparse=$((map_size / cluster / map_every))
n_spull=$((spull_size / cluster / spull_every))
# Rough disk need: base + half of it in the overlay + write source + the sparse
# images' data + one written overlay (sequential write plus what random writes
# allocate) at a time.
need=$((size + size / 2 + wsize + (n_sparse + n_spull) * cluster + 2 * wsize + (1 << 30)))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

base=$tmp/base.qcow2     # BENCH_SIZE, every cluster written
top=$tmp/top.qcow2       # overlay on base: every other MiB written
src=$tmp/source.raw      # BENCH_WRITE_SIZE of random data for the write row
sparse=$tmp/sparse.qcow2 # BENCH_MAP_SIZE, 1 cluster in BENCH_MAP_EVERY written
empty=$tmp/empty.qcow2   # BENCH_MAP_SIZE, nothing written (BENCH_EMPTY_OPTS)
spull=$tmp/spull.qcow2   # BENCH_SPARSE_SIZE, 1 cluster in BENCH_SPARSE_EVERY written

# ---- tidemark build ------------------------------------------------------

declare -A note    # per-server reason for an n/a cell
build_tidemark

# ---- test images -----------------------------------------------------------
# Written with qemu-io (cache=unsafe: nothing is fsynced while building; one
# sync at the end, untimed), from command scripts on stdin, as many aio
# requests in flight as qemu-io will take between flushes.  Patterns, not
# random data: qcow2 does not compress or zero-detect written clusters, so the
# content does not matter, and a pattern is much cheaper to write.

# build_io IMG SCRIPT: runs the qemu-io commands in SCRIPT against IMG (lib.sh's
# qemu_io: failed commands count too).
build_io() { qemu_io "$2" -t unsafe -f qcow2 "$1" || die "qemu-io on $1 failed"; }

# check_alloc IMG EXPECTED_CLUSTERS: qemu-img check is clean and counts them.
check_alloc() {
    local got
    got=$(qemu-img check --output=json "$1" 2>"$tmp/check.err" | jq -e '."allocated-clusters"') ||
        { cat "$tmp/check.err" >&2; die "qemu-img check $1 failed"; }
    ((got == $2)) || die "$1 has $got clusters allocated, expected $2"
}

t_build=$EPOCHREALTIME
qcreate() { qemu-img create -q -f qcow2 -o cluster_size="$cluster" "$@" || die "qemu-img create $*"; }

log "creating $size_str qcow2 base, fully written, and an overlay with every other MiB written"
qcreate "$base" "$size"
awk -v size="$size" 'BEGIN {
    for (o = 0; o < size; o += 64 * 1048576) {
        n = size - o < 64 * 1048576 ? size - o : 64 * 1048576
        printf "aio_write -P 0x5a %.0f %.0f\n", o, n
        if (++k % 4 == 0) print "aio_flush"
    }
    print "aio_flush"
}' >"$tmp/base.cmds"
build_io "$base" "$tmp/base.cmds"
qcreate -b "$(basename "$base")" -F qcow2 "$top" "$size"
awk -v size="$size" 'BEGIN {
    for (o = 0; o < size; o += 2 * 1048576) {
        printf "aio_write -P 0xa5 %.0f 1M\n", o
        if (++k % 16 == 0) print "aio_flush"
    }
    print "aio_flush"
}' >"$tmp/top.cmds"
build_io "$top" "$tmp/top.cmds"
check_alloc "$base" $(((size + cluster - 1) / cluster))
check_alloc "$top" $(((size / (2 << 20)) * (((1 << 20) + cluster - 1) / cluster)))

log "creating $wsize_str write source"
fill "$src" "$wsize"
rm -f "$tmp/chunk"

log "creating $map_size_str sparse qcow2 ($n_sparse clusters of $cluster_str, one in every $map_every) and $map_size_str empty qcow2"
qcreate "$sparse" "$map_size"
# shellcheck disable=SC2086
qcreate $empty_opts "$empty" "$map_size"
qemu-img check -q "$empty" || die "qemu-img check $empty failed"
scatter_cmds "$n_sparse" "$map_every" "$cluster" >"$tmp/sparse.cmds"
build_io "$sparse" "$tmp/sparse.cmds"
check_alloc "$sparse" "$n_sparse"

log "creating $spull_size_str sparse-pull qcow2 ($n_spull clusters of $cluster_str, one in every $spull_every)"
qcreate "$spull" "$spull_size"
scatter_cmds "$n_spull" "$spull_every" "$cluster" >"$tmp/spull.cmds"
build_io "$spull" "$tmp/spull.cmds"
check_alloc "$spull" "$n_spull"
rm -f "$tmp"/*.cmds
log "syncing (untimed)"
sync
t_build=$(awk -v a="$t_build" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')
log "images ready in ${t_build}s"

# ---- helpers -------------------------------------------------------------

serve_img=
server_cmd() { # server_cmd NAME SOCKET: sets the cmd array; serves $serve_img
    case $1 in
    # format probed; tidemark opens the backing chain itself
    tidemark | tidemark-base) cmd=("$(tidemark_of "$1")" serve --max-connections 16 --socket "$2" --export-name '' "$serve_img") ;;
    # as in compare.sh: qemu-nbd's defaults spelled out, --shared=16 so that
    # nbdcopy's and the probes' connections are all accepted
    qemu-nbd) cmd=(qemu-nbd -f qcow2 --cache=writeback --aio=threads --shared=16 --persistent -k "$2" "$serve_img") ;;
    *) die "unknown server $1" ;;
    esac
}

# Before each server: write back what the previous one left dirty, and read
# what the loads read so that each server starts with the same warm cache.
# For the map images only the metadata is read (qemu-img check reads every
# L1/L2/refcount table), not the sparse image's data, which no row reads.  The
# sparse-pull image is read whole (its file is its clusters and metadata).
prepare_cache() {
    sync
    cat "$base" "$top" "$src" "$spull" >/dev/null
    qemu-img check -q "$sparse" >/dev/null 2>&1
    qemu-img check -q "$empty" >/dev/null 2>&1
}

# cpu_ticks: utime + stime of the whole server process (all threads), in ticks
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$srv_pid/stat"; }

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

# pull_mibps BYTES: after timed_pull, its speed in v
pull_mibps() { v=$(awk -v b="$1" -v t="$secs" 'BEGIN { printf "%.0f", b / 1048576 / t }'); }

# map_row SERVER KIND: nbdinfo --map of the served image; sets wall, cpu (s)
map_row() {
    local c0 c1 t0 t1 out=$tmp/map-$2-$1.txt
    c0=$(cpu_ticks) || return 1
    t0=$EPOCHREALTIME
    # shellcheck disable=SC2016 # expanded by sh
    run "$op_timeout" sh -c 'nbdinfo --map "$0" >"$1"' "$uri" "$out" || return 1
    t1=$EPOCHREALTIME
    c1=$(cpu_ticks) || return 1
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    cpu=$(awk -v a="$c0" -v b="$c1" -v hz="$clk_tck" 'BEGIN { printf "%.2f", (b - a) / hz }')
}

# ---- the runs ------------------------------------------------------------

rows=(seq_read pull_c1 pull_c4 rss_pull4 threads_pull4 seq_write rand_read rand_over rand_write
    spull_secs spull_cpu
    map_sparse_wall map_sparse_cpu rss_sparse map_empty_wall map_empty_cpu rss_empty)
spull_pct=$(awk -v e="$spull_every" 'BEGIN { printf "%.3g%%", 100 / e }')
declare -A label=(
    [seq_read]="sequential read of the $size_str chain, all allocated, nbdcopy → null: (MiB/s)"
    [pull_c1]="full pull of the chain, nbdcopy -C 1 → null: (MiB/s)"
    [pull_c4]="full pull of the chain, nbdcopy -C 4 -T 4 → null:, fresh server (MiB/s)"
    [rss_pull4]="peak RSS in that 4-connection pull, VmHWM (MiB, lower is better)"
    [threads_pull4]="server threads during that pull, most seen (sampled every 50 ms; lower is better)"
    [seq_write]="sequential allocating write of $wsize_str into a fresh overlay, nbdcopy file → export (MiB/s)"
    [rand_read]="$bs_str random read on the chain, QD $qd (IOPS)"
    [rand_over]="$bs_str random write on the written overlay's first $wsize_str (overwrites of allocated clusters), QD $qd (IOPS)"
    [rand_write]="$bs_str random write on the written overlay, whole export (overwrites and allocating writes), QD $qd (IOPS)"
    [spull_secs]="sparse pull: $spull_size_str qcow2 with $spull_pct allocated, nbdcopy → null: (s, lower is better)"
    [spull_cpu]="sparse pull: server CPU, utime + stime (s, lower is better)"
    [map_sparse_wall]="nbdinfo --map, $map_size_str sparse ($((100 / map_every))% alloc.): wall (s, lower is better)"
    [map_sparse_cpu]="nbdinfo --map, $map_size_str sparse: server CPU (s, lower is better)"
    [rss_sparse]="peak RSS after the sparse map, VmHWM (MiB, lower is better)"
    [map_empty_wall]="nbdinfo --map, $map_size_str empty: wall (s, lower is better)"
    [map_empty_cpu]="nbdinfo --map, $map_size_str empty: server CPU (s, lower is better)"
    [rss_empty]="peak RSS after the empty map, VmHWM (MiB, lower is better)"
)
[[ $((100 % map_every)) == 0 ]] || label[map_sparse_wall]="nbdinfo --map, $map_size_str sparse (1 cluster in $map_every): wall (s, lower is better)"
declare -A res      # res[server,row]
declare -A mconn    # can_multi_conn as the server advertises it
declare -A extents  # extents[server,kind]: lines of nbdinfo --map

for s in $servers; do
    [[ $s == tidemark && -n ${note[tidemark]:-} ]] && { log "tidemark: skipped (${note[tidemark]})"; continue; }

    log "$s: preparing page cache"
    prepare_cache
    log "$s: serving the chain (top.qcow2 over base.qcow2)"
    serve_img=$top
    if start_server "$s" chain; then
        mconn[$s]=$(nbdinfo --can multi-conn "$uri" >/dev/null 2>&1 && echo yes || echo no)
        log "$s: seq_read"; v=; seq_read || v=; record "$s" seq_read
        log "$s: pull_c1"; v=; timed_pull -C 1 -T 1 && pull_mibps "$size" || v=; record "$s" pull_c1
        log "$s: rand_read"; v=; rand_io read || v=; record "$s" rand_read
        stop_server
    else
        log "$s: ${note[$s]}"
    fi

    # a fresh server, so that its peak RSS and threads are this pull's
    log "$s: serving the chain again, for a pull with 4 connections"
    if start_server "$s" pull4; then
        log "$s: pull_c4"
        sample_threads_start "$tmp/threads-$s.txt"
        v=; timed_pull -C 4 -T 4 && pull_mibps "$size" || v=
        t=$(sample_threads_stop "$tmp/threads-$s.txt") || t=
        record "$s" pull_c4
        if [[ -n $v ]] && kill -0 "$srv_pid" 2>/dev/null; then
            v=$(peak_rss_mib) || v=; record "$s" rss_pull4
            v=$t; record "$s" threads_pull4
        fi
        stop_server
    else
        log "$s: ${note[$s]}"
    fi

    w=$tmp/write-$s.qcow2
    qcreate -b "$(basename "$base")" -F qcow2 "$w" "$size"
    sync
    log "$s: serving a fresh overlay over base.qcow2"
    serve_img=$w
    if start_server "$s" write; then
        log "$s: seq_write"; v=; seq_write || v=; record "$s" seq_write
        log "$s: rand_over"; v=; rand_io write "$wsize" || v=; record "$s" rand_over
        log "$s: rand_write"; v=; rand_io write || v=; record "$s" rand_write
        stop_server
    else
        log "$s: ${note[$s]}"
    fi
    rm -f "$w"
    sync

    for kind in sparse empty; do
        if [[ $kind == sparse ]]; then serve_img=$sparse; else serve_img=$empty; fi
        log "$s: serving the $map_size_str $kind image"
        start_server "$s" "$kind" || { log "$s: ${note[$s]}"; continue; }
        log "$s: nbdinfo --map ($kind)"
        if map_row "$s" "$kind"; then
            res[$s,map_${kind}_wall]=$wall
            res[$s,map_${kind}_cpu]=$cpu
            extents[$s,$kind]=$(wc -l <"$tmp/map-$kind-$s.txt")
            log "$s: map $kind: ${wall}s wall, ${cpu}s server CPU, ${extents[$s,$kind]} extents"
        else
            v=; record "$s" "map_$kind"
        fi
        if kill -0 "$srv_pid" 2>/dev/null; then
            res[$s,rss_$kind]=$(peak_rss_mib) || unset "res[$s,rss_$kind]"
        fi
        stop_server
    done

    serve_img=$spull
    log "$s: serving the $spull_size_str sparse-pull image"
    if start_server "$s" spull; then
        log "$s: sparse pull"
        # shellcheck disable=SC2086
        if timed_pull $nbdcopy_opts; then
            res[$s,spull_secs]=$secs res[$s,spull_cpu]=$cpu
            log "$s: sparse pull: ${secs}s, server CPU ${cpu}s"
        else
            v=; record "$s" spull
        fi
        stop_server
    else
        log "$s: ${note[$s]}"
    fi
done

# ---- report --------------------------------------------------------------

commit=$(checkout_id)

cat <<EOF
## tidemark vs qemu-nbd on qcow2

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)
- images ($(df --output=fstype "$tmp" | tail -n 1), cluster $cluster_str, built in ${t_build}s with $(ver qemu-img --version | cut -d' ' -f1-3)):
  chain = top.qcow2 (every other MiB written) over base.qcow2 ($(numfmt --to=iec "$size"), every cluster written);
  write rows: a fresh empty overlay over base.qcow2 per server;
  map rows: $(numfmt --to=iec "$map_size") qcow2 with $n_sparse clusters written (one at a seeded random place in every $map_every), and an empty one${empty_opts:+ (\`$empty_opts\`)};
  sparse pull: $(numfmt --to=iec "$spull_size") qcow2 with $n_spull clusters written (one at a seeded random place in every $spull_every)
- page cache: before each server, sync, then the chain and write source read once and the map images' metadata read (qemu-img check)
- servers run one at a time, in this order: $servers; each image on a fresh unix socket; the write rows on the server's own overlay
- tidemark ($commit): \`target/release/tidemark serve --max-connections 16 --socket S --export-name '' IMG\` (format probed)
- $(ver qemu-nbd --version): \`qemu-nbd -f qcow2 --cache=writeback --aio=threads --shared=16 --persistent -k S IMG\`
- sequential: $(ver nbdcopy --version), \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} URI null:\` and \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} SRC URI\` (several connections only if the server advertises multi-conn); the random writes follow the sequential write on the same overlay, first the overwrites (offsets in the written $wsize_str), then the whole export
- pulls (the full pulls and the sparse pull): each the median of ${BENCH_PULL_REPS:-3} in a row on the same server
- full pulls of the chain: \`nbdcopy -C 1 -T 1 URI null:\` after the sequential read on the same server; \`nbdcopy -C 4 -T 4 URI null:\` on a fresh server, its VmHWM read after the pull and its Threads (/proc/PID/status) sampled every 50 ms during it
- sparse pull: a fresh server, \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} URI null:\`; server CPU = utime + stime (all threads, /proc/PID/stat) read before and after
- random: $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine"; else echo "benches/randio.py (python3-libnbd aio)"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s per row, whole export
- map: $(ver nbdinfo --version), \`nbdinfo --map URI\` (base:allocation); server CPU = utime+stime from /proc/PID/stat before and after; peak RSS = VmHWM after the map

| load | tidemark | qemu-nbd | tidemark / qemu-nbd |
|---|---:|---:|---:|
EOF
for row in "${rows[@]}"; do
    printf '| %s | %s | %s | %s |\n' "${label[$row]}" \
        "$(cell tidemark "$row")" "$(cell qemu-nbd "$row")" "$(ratio tidemark "$row")"
done
base_table "${rows[@]}"
echo
echo "Ratios are tidemark / qemu-nbd: above 1x is better for MiB/s and IOPS, below 1x is better for seconds, MiB and threads."

# issue 13's qcow2 rows, in its table's terms
cat <<EOF

### Issue 13, qcow2 rows (tidemark / qemu-nbd; above 1x is better, except the sparse pull, RSS and the map time: below 1x is better)

| load | tidemark | goal |
|---|---:|---:|
EOF
issue_row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3"; } # issue_row LABEL CELL GOAL
issue_row "qcow2 $bs_str random read, QD $qd" "$(ratio tidemark rand_read)" "≥ 2.5x"
issue_row "qcow2 $bs_str random write, QD $qd (overwrites)" "$(ratio tidemark rand_over)" "≥ 1.5x"
issue_row "qcow2 full pull, nbdcopy -C 1 to null" "$(ratio tidemark pull_c1)" "≥ 1.3x"
issue_row "sparse pull: $spull_size_str qcow2 with $spull_pct allocated, nbdcopy to null (time; below 1x is better)" "$(ratio tidemark spull_secs)" "≤ 0.7x"
issue_row "… server CPU during that pull (below 1x is better)" "$(ratio tidemark spull_cpu)" ""
issue_row "peak RSS in a qcow2 pull, 4 connections (below 1x is better)" \
    "$(ratio tidemark rss_pull4), with $(cell tidemark threads_pull4) threads (qemu-nbd: $(cell qemu-nbd threads_pull4))" \
    "≤ 1.0x, threads ≤ 4 × cores = $((4 * $(nproc)))"
issue_row "$map_size_str empty qcow2 \`base:allocation\` map, nbdinfo --map (time; below 1x is better)" "$(ratio tidemark map_empty_wall)" "keep"
echo
printf -- '- can_multi_conn (chain):'
for s in tidemark qemu-nbd; do printf ' %s=%s' "$s" "${mconn[$s]:-n/a}"; done
echo
for kind in sparse empty; do
    a=$tmp/map-$kind-tidemark.txt b=$tmp/map-$kind-qemu-nbd.txt
    printf -- '- map of the %s image: tidemark %s extents, qemu-nbd %s extents' "$kind" \
        "${extents[tidemark,$kind]:-n/a}" "${extents[qemu-nbd,$kind]:-n/a}"
    if [[ -f $a && -f $b ]]; then
        if cmp -s "$a" "$b"; then echo ", identical"; else echo ", DIFFERENT"; fi
    else
        echo
    fi
done
for s in tidemark qemu-nbd; do
    [[ -n ${note[$s]:-} ]] && echo "- $s: ${note[$s]}"
    [[ " $servers " != *" $s "* ]] && echo "- $s: not run (BENCH_SERVERS)"
done
exit 0
