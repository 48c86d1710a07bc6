#!/usr/bin/env bash
# The intent log of persistent bitmaps (tidemark daemon --bitmap-intent-log
# on|off; src/block/qcow2/intent.rs, src/store_point.rs): what it costs guest
# writes, how fast a crash is recovered, and how long a store point holds
# writes up.  qemu-storage-daemon (qsd) runs the same loads as a reference
# (it has no intent log: its bitmaps are inconsistent after a crash).
#   (1) 4k random-write IOPS (fio nbd engine or randio.py, one connection,
#       QD 16) on a fully allocated BENCH_SIZE qcow2 with one recording
#       persistent bitmap: log off, log on, qsd; each daemon freshly started,
#       a cold run (every 64 MiB zone's first touch since the open is in it),
#       then one write into every zone, then a warm run (all zones durable);
#       IOPS and the daemon's CPU time per write; plus the fdatasync calls of
#       both loads, counted in separate untimed runs (under strace, else with
#       TIDEMARK_IO_TRACE).
#   (2) recovery: a 1 TiB qcow2 with 8 persistent bitmaps; the daemon (log on)
#       takes one 64 KiB write in each of 2000 random zones, a flush, then
#       kill -9; then `tidemark bitmap --recover` (offline) on one copy of the
#       image, and a daemon restart (recovery at open) on another, timed until
#       QMP answers query-named-block-nodes with the bitmaps; both checked
#       (8 bitmaps recovered, each covering every write: qemu-nbd reads the
#       offline result; qemu-img check).  References: a clean restart of the
#       same image, and qsd restarted after the same crash.
#   (3) a store point's pause: per-request latency of 4k random writes
#       (intent_io.py latency, 2000/s, at most 16 in flight) on a 64 GiB
#       qcow2 (preallocation=metadata) with a 4 KiB granularity bitmap
#       (2 MiB), x-tidemark-bitmap-store sent every 2 s over QMP meanwhile;
#       p50 / p99 / max of the requests that overlapped a store point and of
#       those that did not; references: the same writer without store
#       points, and on qsd.
# Prints a markdown report on stdout; progress goes to stderr.  See
# benches/README.md.  Helpers: benches/lib.sh, benches/intent_io.py (NBD and
# QMP loads), benches/qmp_job.py (its QMP client).
#
# Usage: benches/intent.sh              (from anywhere; builds tidemark first)
#
# Environment (all optional):
#   BENCH_SIZE=4G          row 1's image (preallocation=full qcow2); multiple of 1 MiB
#   BENCH_RAND_SECS=10     seconds of each row-1 load (cold and warm)
#   BENCH_QD=16 BENCH_BS=4k  row-1 queue depth and request size
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists)
#   BENCH_REPS=2           row-1 rounds (order off on qsd, then reversed, ...);
#                          the report gives the median of each cell
#   BENCH_STORE_INTERVAL=30  tidemark's --bitmap-store-interval (rows 1-3; the
#                          default of the daemon)
#   BENCH_FSYNC_COUNT=auto strace | trace (TIDEMARK_IO_TRACE flush records) |
#                          none | auto (strace if installed, else trace)
#   BENCH_COUNT_SECS=BENCH_RAND_SECS  load of each fsync-counting run
#   BENCH_REC_SIZE=1T      row 2's image size
#   BENCH_REC_BITMAPS=8    row 2's persistent bitmaps
#   BENCH_REC_ZONES=2000   row 2: zones written (one 64 KiB write in each)
#   BENCH_LAT_SIZE=64G     row 3's image size (sparse)
#   BENCH_LAT_GRAN=4k      row 3's bitmap granularity
#   BENCH_LAT_PREALLOC=metadata  row 3's qemu-img create preallocation: metadata
#                          (writes do not allocate clusters) or off (sparse:
#                          each 4k write allocates and fills a 64 KiB cluster,
#                          16x the page-cache data to write back)
#   BENCH_LAT_SECS=12      row 3: seconds of each writer run
#   BENCH_LAT_QD=16        row 3's queue depth (at most in flight)
#   BENCH_LAT_RATE=2000    row 3's writes per second (0: as fast as QD allows;
#                          the data written, which every store point's
#                          fdatasync writes back, grows with it)
#   BENCH_STORE_EVERY=2    row 3: seconds between store points (the first
#                          at 2 s)
#   BENCH_ROWS="iops recovery pause"  which rows, in this order
#   BENCH_DAEMONS="qsd tidemark"      drop qsd for tidemark alone
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default target/release/tidemark)
#   BENCH_START_TIMEOUT=30 seconds a daemon gets to answer (NBD or QMP)
#   BENCH_OP_TIMEOUT=600   seconds any one other step may take
#   BENCH_KEEP=1           keep the temp dir (images, daemon logs, JSON)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

# shellcheck source=benches/lib.sh
. "$here/lib.sh"
daemon_knobs   # BENCH_SIZE, BENCH_RAND_SECS, BENCH_QD, BENCH_BS, ... TIDEMARK_BIN

reps=${BENCH_REPS:-2}
store_interval=${BENCH_STORE_INTERVAL:-30}
fsync_count=${BENCH_FSYNC_COUNT:-auto}
count_secs=${BENCH_COUNT_SECS:-$rand_secs}
rec_size_str=${BENCH_REC_SIZE:-1T}
rec_bitmaps=${BENCH_REC_BITMAPS:-8}
rec_zones=${BENCH_REC_ZONES:-2000}
lat_size_str=${BENCH_LAT_SIZE:-64G}
lat_gran=${BENCH_LAT_GRAN:-4k}
lat_prealloc=${BENCH_LAT_PREALLOC:-metadata}
lat_secs=${BENCH_LAT_SECS:-12}
lat_qd=${BENCH_LAT_QD:-16}
lat_rate=${BENCH_LAT_RATE:-2000}
store_every=${BENCH_STORE_EVERY:-2}
rows=${BENCH_ROWS:-iops recovery pause}
cluster=65536   # every image's cluster size

for n in reps store_interval count_secs rec_bitmaps rec_zones lat_secs lat_qd lat_rate store_every; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a whole number (BENCH_*)"
done
((reps >= 1 && count_secs >= 1 && rec_bitmaps >= 1 && lat_secs >= 3 && lat_qd >= 1 && store_every >= 1)) ||
    die "BENCH_REPS, BENCH_COUNT_SECS, BENCH_REC_BITMAPS, BENCH_LAT_QD, BENCH_STORE_EVERY must be positive, BENCH_LAT_SECS at least 3"
rec_size=$(to_bytes "$rec_size_str") || die "bad BENCH_REC_SIZE: $rec_size_str"
lat_size=$(to_bytes "$lat_size_str") || die "bad BENCH_LAT_SIZE: $lat_size_str"
[[ $lat_prealloc =~ ^(metadata|off)$ ]] || die "BENCH_LAT_PREALLOC must be metadata or off"
for g in $rows; do [[ $g =~ ^(iops|recovery|pause)$ ]] || die "BENCH_ROWS: unknown row $g (iops, recovery, pause)"; done
has() { [[ " $rows " == *" $1 "* ]]; }
has_qsd() { [[ " $servers " == *" qsd "* ]]; }
[[ " $servers " == *" tidemark "* ]] || die "BENCH_DAEMONS must include tidemark"
case $fsync_count in
auto) if command -v strace >/dev/null; then fsync_count=strace; else fsync_count=trace; fi ;;
strace) command -v strace >/dev/null || die "strace not installed (BENCH_FSYNC_COUNT=trace counts with TIDEMARK_IO_TRACE)" ;;
trace | none) ;;
*) die "BENCH_FSYNC_COUNT must be strace, trace, none or auto" ;;
esac
has iops && select_randio
if has_qsd; then
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found (or BENCH_DAEMONS=tidemark)"
fi
if has recovery; then
    command -v qemu-nbd >/dev/null || die "qemu-nbd not found (qemu-utils)"
fi

# zone_bytes SIZE: the intent log's zone size for a disk of SIZE with 64 KiB
# clusters (intent.rs zone_shift: 64 MiB, more when the map would pass 4 KiB)
zone_bytes() {
    local shift=26 max=$((cluster / 4 < 4096 ? cluster / 4 : 4096))
    while (((($1 + (1 << shift) - 1) >> shift) > max * 8)); do shift=$((shift + 1)); done
    echo $((1 << shift))
}

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-intent-bench.XXXXXX") || die "mktemp failed"
aux_pid=    # a background helper: the store-point loop, qemu-nbd
inner_pid=  # the daemon when srv_pid is strace's
# shellcheck disable=SC2317 # invoked by the trap
intent_cleanup() {
    [[ -n $aux_pid ]] && { kill -TERM "$aux_pid" 2>/dev/null; wait "$aux_pid" 2>/dev/null; }
    [[ -n $inner_pid ]] && kill -TERM "$inner_pid" 2>/dev/null
    cleanup
}
trap intent_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# row 1's image; row 3's writes allocate up to ~64 KiB per request
need=$((size + 16 * (1 << 30)))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

declare -A note res
build_tidemark
[[ -n $build_failed ]] && die "${note[tidemark]}"
[[ -x $tidemark_bin ]] || die "no tidemark binary at $tidemark_bin"

# io_run OUT SECS ARGS...: intent_io.py in the background (run), its JSON in OUT
io_run() {
    local out=$1 t=$2
    shift 2
    # shellcheck disable=SC2016 # expanded by the inner sh
    run "$t" sh -c '"$@" >"$0"' "$out" "$py" "$here/intent_io.py" "$@"
}
ms() { awk -v s="$1" 'BEGIN { printf "%.1f", s }'; }
since() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.3f", b - a }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

# ---- daemons ----------------------------------------------------------------
# server_cmd NAME SOCKET (for lib.sh's start_server): the same command line for
# qsd and tidemark (daemon_cmd), on $image; tidemark also gets
# --bitmap-intent-log $log_mode --bitmap-store-interval $store_interval, and
# runs under $wrap (strace) when set.
image=''
log_mode=on
wrap=()
server_cmd() {
    local extra=()
    [[ $1 == tidemark ]] && extra=(--bitmap-intent-log "$log_mode" --bitmap-store-interval "$store_interval")
    daemon_cmd "$1" "$2" "${extra[@]}" --blockdev "driver=file,node-name=srcf,filename=$(qemu_opt "$image")" \
        --blockdev "driver=qcow2,node-name=src,file=srcf"
    [[ $1 == tidemark && ${#wrap[@]} -gt 0 ]] && cmd=("${wrap[@]}" "${cmd[@]}")
    return 0
}
tm_extra="--bitmap-intent-log on|off --bitmap-store-interval $store_interval"

# launch NAME TAG: starts the daemon without waiting (rows 2: the caller
# polls QMP); sets srv_pid, qmp, uri
launch() {
    local sock=$tmp/$1-$2.sock
    uri="nbd+unix:///?socket=$sock"
    server_cmd "$1" "$sock"
    "${cmd[@]}" >"$tmp/$1-$2.log" 2>&1 &
    srv_pid=$!
}

# qmp_ready OUT: polls the daemon's QMP socket (intent_io.py qmpwait, every
# 2 ms, BENCH_START_TIMEOUT) until query-named-block-nodes lists node src with
# its bitmaps; the answer's wall-clock time is .at in OUT
qmp_ready() {
    io_run "$1" $((start_timeout + 10)) qmpwait "$qmp" --node src --timeout "$start_timeout" && jq -e .at "$1" >/dev/null
}

crash() { # SIGKILL to the daemon
    kill -KILL "$srv_pid" 2>/dev/null
    wait "$srv_pid" 2>/dev/null
    srv_pid=
}

prepare_cache() { sync; cat "$image" >/dev/null; }

# ============================================================================
# Row 1: IOPS, log on / off / qsd, cold and warm
# ============================================================================

# count_fsyncs MODE: a tidemark start with --bitmap-intent-log MODE, then
# (untimed, BENCH_COUNT_SECS each) the cold load, one write into every zone,
# the warm load: the fdatasync + fsync calls on the image during each load;
# sets fs_cold and fs_warm (or why)
count_fsyncs() {
    local mode=$1 st=$tmp/strace-$1.txt tdir=$tmp/trace-$1 tf keep_secs=$rand_secs t=() i
    fs_cold='' fs_warm='' why=''
    log_mode=$mode
    qemu-img bitmap --clear "$image" b0 || { why="qemu-img bitmap --clear failed"; return 1; }
    prepare_cache
    if [[ $fsync_count == strace ]]; then
        wrap=(strace -f --seccomp-bpf -e "trace=fsync,fdatasync" -ttt -o "$st")
    else
        rm -rf "$tdir"
        mkdir -p "$tdir"
        export TIDEMARK_IO_TRACE=$tdir
    fi
    start_server tidemark "count-$mode"
    local ok=$?
    wrap=()
    unset TIDEMARK_IO_TRACE
    ((ok == 0)) || { why=${note[tidemark]}; return 1; }
    inner_pid=$(cat "${qmp%.qmp}.pid" 2>/dev/null)
    tf=$tdir/$(basename "$image").trace
    # mark: a load boundary (the daemon is idle then): the time, or the trace's size
    mark() { if [[ $fsync_count == strace ]]; then t+=("$EPOCHREALTIME"); else t+=("$(stat -c %s "$tf" 2>/dev/null || echo 0)"); fi; }
    rand_secs=$count_secs
    mark
    rand_io write || why="the cold load failed"
    mark
    io_run "$tmp/touch.json" "$op_timeout" scatter "$uri" --zone "$(zone_bytes "$size")" --zones all --len "$bs" ||
        why="touching every zone failed"
    mark
    rand_io write || why="the warm load failed"
    mark
    rand_secs=$keep_secs
    if [[ $fsync_count == trace && -z $why ]]; then
        for i in 0 2; do
            io_run "$tmp/flushes-$mode-$i.json" "$op_timeout" flushes "$tf" --from "${t[i]}" --to "${t[i + 1]}" ||
                why="reading the I/O trace failed"
        done
        fs_cold=$(jq .flushes "$tmp/flushes-$mode-0.json") fs_warm=$(jq .flushes "$tmp/flushes-$mode-2.json")
    fi
    # a clean stop: SIGTERM to the daemon itself (strace exits with it)
    if [[ -n $inner_pid ]]; then
        kill -TERM "$inner_pid" 2>/dev/null
        local deadline=$((SECONDS + 15))
        while kill -0 "$inner_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
        inner_pid=
    fi
    stop_server
    rm -rf "$tdir"
    if [[ $fsync_count == strace && -z $why ]]; then
        in_window() { awk -v a="$1" -v b="$2" '$2 >= a && $2 <= b && /(fsync|fdatasync)\(/ { n++ } END { print n + 0 }' "$st"; }
        fs_cold=$(in_window "${t[0]}" "${t[1]}") fs_warm=$(in_window "${t[2]}" "${t[3]}")
    fi
    [[ -n $fs_cold && -n $fs_warm ]]
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$srv_pid/stat"; }
last() { awk '{ print $NF }' <<<"$1"; }
# timed_load SERVER CFG cold|warm: the random writes; appends their IOPS and
# the daemon's CPU time (utime + stime, all threads) per write to r1
timed_load() {
    local c0 c1
    c0=$(cpu_ticks)
    v=''
    if rand_io write; then
        c1=$(cpu_ticks)
        r1[$2,$3]+=" $v"
        r1[$2,${3}cpu]+=" $(awk -v t=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v iops="$v" -v s="$rand_secs" \
            'BEGIN { printf "%.1f", t / hz * 1e6 / (iops * s) }')"
    else
        add_note "$1" "row 1 ($2) $3 run failed"
    fi
}

row_iops() {
    local img=$tmp/iops.qcow2 t_img cfgs order cfg s t0 zone
    image=$img
    zone=$(zone_bytes "$size")
    log "row 1: creating the $size_str qcow2 (preallocation=full) with bitmap b0"
    t_img=$EPOCHREALTIME
    qemu-img create -q -f qcow2 -o cluster_size=$cluster,preallocation=full "$img" "$size" || die "qemu-img create failed"
    qemu-img bitmap --add "$img" b0 || die "qemu-img bitmap --add failed"
    sync
    iops_build=$(since "$t_img")
    log "row 1: image ready in ${iops_build}s; $((size / zone)) zones of $(numfmt --to=iec "$zone")"
    cfgs="off on"
    has_qsd && cfgs+=" qsd"
    declare -gA r1   # r1[CFG,cold|warm|coldcpu|warmcpu] = IOPS / CPU µs per write, of each round
    warm_late=''
    for ((rep = 1; rep <= reps; rep++)); do
        order=$cfgs
        ((rep % 2 == 0)) && order=$(tr ' ' '\n' <<<"$cfgs" | tac | tr '\n' ' ')
        for cfg in $order; do
            s=tidemark
            if [[ $cfg == qsd ]]; then s=qsd; else log_mode=$cfg; fi
            qemu-img bitmap --clear "$img" b0 || die "qemu-img bitmap --clear failed"
            log "row 1, round $rep: $cfg: preparing page cache"
            prepare_cache
            start_server "$s" "iops-$cfg" || { add_note "$s" "row 1 ($cfg): ${note[$s]}"; continue; }
            t0=$EPOCHREALTIME
            log "row 1, round $rep: $cfg: cold run ($bs_str random writes, QD $qd, ${rand_secs}s)"
            timed_load "$s" "$cfg" cold
            io_run "$tmp/touch.json" "$op_timeout" scatter "$uri" --zone "$zone" --zones all --len "$bs" ||
                add_note "$s" "row 1 ($cfg): touching every zone failed"
            log "row 1, round $rep: $cfg: warm run (every zone touched)"
            timed_load "$s" "$cfg" warm
            # a periodic store point starts a new epoch: zones are cold again
            if [[ $cfg != qsd ]] && ((store_interval > 0)) &&
                awk -v t="$(since "$t0")" -v i="$store_interval" 'BEGIN { exit !(t >= i) }'; then
                warm_late+=" $cfg"
            fi
            stop_daemon "$s"
            log "row 1, round $rep: $cfg: cold $(last "${r1[$cfg,cold]:-}") IOPS ($(last "${r1[$cfg,coldcpu]:-}") µs CPU per write), warm $(last "${r1[$cfg,warm]:-}") IOPS ($(last "${r1[$cfg,warmcpu]:-}") µs)"
        done
    done
    for cfg in $cfgs; do
        for k in cold warm coldcpu warmcpu; do
            # shellcheck disable=SC2086 # the list is meant to split
            [[ -n ${r1[$cfg,$k]:-} ]] &&
                res[r1,$cfg,$k]=$(awk -v m="$(median ${r1[$cfg,$k]})" -v f="$([[ $k == *cpu ]] && echo %.1f || echo %.0f)" 'BEGIN { printf f, m }')
        done
    done
    if [[ $fsync_count != none ]]; then
        for cfg in off on; do
            log "row 1: counting fsyncs of the cold run, log $cfg ($fsync_count, untimed, ${count_secs}s)"
            if count_fsyncs "$cfg"; then
                res[r1,$cfg,fsyncs]=$fs_cold res[r1,$cfg,fsyncs_warm]=$fs_warm
                log "row 1: log $cfg: $fs_cold fsync/fdatasync calls in the cold load, $fs_warm in the warm one"
            else
                add_note tidemark "fsync count (log $cfg): $why"
            fi
        done
    fi
    rm -f "$img"
}

# ============================================================================
# Row 2: recovery after kill -9
# ============================================================================

# check_bitmaps JSON WANT-MIN: the qmpwait answer has rec_bitmaps bitmaps,
# none inconsistent, each counting at least WANT-MIN bytes; sets why
check_bitmaps() {
    local got
    got=$(jq --argjson min "$2" '[.bitmaps[] | select((.inconsistent // false) == false and .count >= $min)] | length' "$1")
    if [[ $got != "$rec_bitmaps" ]]; then
        why="$got of $rec_bitmaps bitmaps consistent and covering the writes: $(jq -c '[.bitmaps[] | {name, count, inconsistent}]' "$1")"
        return 1
    fi
}

row_recovery() {
    local img=$tmp/rec.qcow2 img2=$tmp/rec-restart.qcow2 zone ranges=$tmp/rec-ranges.txt t0 want nb
    zone=$(zone_bytes "$rec_size")
    nb=$(seq 0 $((rec_bitmaps - 1)) | sed 's/^/b/')
    want=$((rec_zones * 65536))
    mk_rec() { # mk_rec IMG: a fresh sparse image with the bitmaps
        rm -f "$1"
        qemu-img create -q -f qcow2 -o cluster_size=$cluster "$1" "$rec_size" || return 1
        for b in $nb; do qemu-img bitmap --add "$1" "$b" || return 1; done
    }
    log "row 2: $rec_size_str qcow2 with $rec_bitmaps persistent bitmaps"
    mk_rec "$img" || die "could not create $img"
    image=$img log_mode=on
    start_server tidemark rec || { add_note tidemark "row 2: ${note[tidemark]}"; return 1; }
    log "row 2: one 64 KiB write in each of $rec_zones random $(numfmt --to=iec "$zone") zones, a flush, then kill -9"
    io_run "$tmp/rec-scatter.json" "$op_timeout" scatter "$uri" --zone "$zone" --zones "$rec_zones" \
        --len 65536 --qd 16 --seed 7 --flush --ranges "$ranges" || { add_note tidemark "row 2: the writes failed"; stop_server; return 1; }
    res[r2,scatter]=$(jq .secs "$tmp/rec-scatter.json")
    crash
    res[r2,crash_check]=$(qemu-img check -U --output=json "$img" 2>/dev/null | jq -r '"\(."check-errors") errors, \(.leaks // 0) leaks"')
    res[r2,crash_flags]=$(qemu-img info -U --output=json "$img" | jq -r '[."format-specific".data.bitmaps[] | select(.flags | index("in-use"))] | length')
    cp --sparse=always "$img" "$img2" || die "cp failed"
    sync

    # (a) offline
    log "row 2: tidemark bitmap --recover (offline)"
    t0=$EPOCHREALTIME
    # shellcheck disable=SC2016 # expanded by the inner sh
    if run "$op_timeout" sh -c '"$@" >"$0" 2>"$0.err"' "$tmp/recover.out" "$tidemark_bin" bitmap --recover "$img"; then
        res[r2,offline]=$(since "$t0")
        res[r2,offline_n]=$(grep -c "^recovered bitmap" "$tmp/recover.out")
        res[r2,offline_added]=$(awk '/^recovered bitmap/ { print $4; exit }' "$tmp/recover.out")
        log "row 2: offline recovery ${res[r2,offline]}s: $(head -n 1 "$tmp/recover.out")"
    else
        add_note tidemark "row 2: tidemark bitmap --recover failed: $(tail -n 2 "$tmp/recover.out.err")"
    fi
    # qemu's view of the result: consistent flags, a clean check, every write dirty
    res[r2,offline_check]=$(qemu-img check --output=json "$img" 2>/dev/null | jq -r '"\(."check-errors") errors, \(.leaks // 0) leaks"')
    res[r2,offline_inuse]=$(qemu-img info --output=json "$img" | jq -r '[."format-specific".data.bitmaps[] | select(.flags | index("in-use"))] | length')
    local qsock=$tmp/qemu-nbd.sock deadline bargs=()
    for b in $nb; do bargs+=(-B "$b"); done
    qemu-nbd --persistent -r -f qcow2 -k "$qsock" "${bargs[@]}" "$img" 2>"$tmp/qemu-nbd.log" &
    aux_pid=$!
    deadline=$((SECONDS + start_timeout))
    until nbdinfo --size "nbd+unix:///?socket=$qsock" >/dev/null 2>&1 || ((SECONDS >= deadline)) || ! kill -0 "$aux_pid" 2>/dev/null; do sleep 0.05; done
    # shellcheck disable=SC2086 # the bitmap names are meant to split
    if io_run "$tmp/covered.json" "$op_timeout" covered "nbd+unix:///?socket=$qsock" --ranges "$ranges" $nb; then
        res[r2,covered]="qemu-nbd: all $(jq .ranges "$tmp/covered.json") writes dirty in all $rec_bitmaps bitmaps"
    else
        res[r2,covered]="qemu-nbd: $(jq -r '"\(.missing) (write, bitmap) pairs NOT dirty"' "$tmp/covered.json" 2>/dev/null || echo "check failed")"
        add_note tidemark "row 2: after the offline recovery, ${res[r2,covered]}"
    fi
    kill -TERM "$aux_pid" 2>/dev/null
    wait "$aux_pid" 2>/dev/null
    aux_pid=

    # (b) daemon restart on the other copy: recovery at open
    log "row 2: daemon restart on the crashed copy"
    image=$img2
    t0=$EPOCHREALTIME
    launch tidemark rec-restart
    if qmp_ready "$tmp/rec-restart.json"; then
        res[r2,restart]=$(since "$t0" "$(jq .at "$tmp/rec-restart.json")")
        if check_bitmaps "$tmp/rec-restart.json" "$want"; then
            res[r2,restart_state]="$rec_bitmaps of $rec_bitmaps consistent, x-tidemark-recovered-bytes $(jq '[.bitmaps[]."x-tidemark-recovered-bytes"] | unique | join(",")' "$tmp/rec-restart.json")"
        else
            res[r2,restart_state]=$why
            add_note tidemark "row 2: after the restart, $why"
        fi
        log "row 2: restart answered after ${res[r2,restart]}s: ${res[r2,restart_state]}"
    else
        add_note tidemark "row 2: the restarted daemon did not answer QMP: $(jq -r .error "$tmp/rec-restart.json" 2>/dev/null)"
    fi
    stop_daemon tidemark
    # (c) a clean restart of the same image, for reference
    t0=$EPOCHREALTIME
    launch tidemark rec-clean
    if qmp_ready "$tmp/rec-clean.json"; then
        res[r2,clean]=$(since "$t0" "$(jq .at "$tmp/rec-clean.json")")
        check_bitmaps "$tmp/rec-clean.json" "$want" || add_note tidemark "row 2: after the clean restart, $why"
    fi
    stop_daemon tidemark
    res[r2,restart_check]=$(qemu-img check --output=json "$img2" 2>/dev/null | jq -r '"\(."check-errors") errors, \(.leaks // 0) leaks"')
    rm -f "$img" "$img2"

    # (d) qsd: the same crash
    if has_qsd; then
        log "row 2: qsd, the same writes and crash"
        image=$tmp/rec-qsd.qcow2
        mk_rec "$image" || die "could not create $image"
        if start_server qsd rec; then
            io_run "$tmp/rec-scatter-qsd.json" "$op_timeout" scatter "$uri" --zone "$zone" --zones "$rec_zones" \
                --len 65536 --qd 16 --seed 7 --flush || add_note qsd "row 2: the writes failed"
            crash
            t0=$EPOCHREALTIME
            launch qsd rec-restart
            if qmp_ready "$tmp/rec-restart-qsd.json"; then
                res[r2,qsd_restart]=$(since "$t0" "$(jq .at "$tmp/rec-restart-qsd.json")")
                res[r2,qsd_state]="$(jq '[.bitmaps[] | select(.inconsistent == true)] | length' "$tmp/rec-restart-qsd.json") of $rec_bitmaps inconsistent"
            else
                add_note qsd "row 2: the restarted qsd did not answer QMP"
            fi
            stop_daemon qsd
        else
            add_note qsd "row 2: ${note[qsd]}"
        fi
        rm -f "$image"
    fi
}

# ============================================================================
# Row 3: latency during store points
# ============================================================================

# lat_run CFG: a fresh sparse image, daemon CFG (tidemark-stores,
# tidemark-none, qsd), the writer for BENCH_LAT_SECS; with store points
# every BENCH_STORE_EVERY s from 2 s on for tidemark-stores; the analysis
# in $tmp/lat-CFG.json
lat_run() {
    local cfg=$1 s=tidemark img=$tmp/lat.qcow2 out=$tmp/lat-$1
    [[ $cfg == qsd ]] && s=qsd
    rm -f "$img"
    if ! qemu-img create -q -f qcow2 -o cluster_size=$cluster,preallocation="$lat_prealloc" "$img" "$lat_size" ||
        ! qemu-img bitmap --add -g "$lat_gran" "$img" b0; then
        die "could not create $img"
    fi
    image=$img log_mode=on
    sync
    start_server "$s" "lat-$cfg" || { add_note "$s" "row 3: ${note[$s]}"; return 1; }
    # every zone durable before the clock starts (as for a warm run in row 1)
    io_run "$out.touch.json" "$op_timeout" scatter "$uri" --zone "$(zone_bytes "$lat_size")" --zones all --len "$bs" ||
        add_note "$s" "row 3 ($cfg): touching every zone failed"
    if [[ $cfg == tidemark-stores ]]; then
        "$py" "$here/intent_io.py" stores "$qmp" --node src --secs $((lat_secs - 1)) --delay 2 \
            --every "$store_every" --out "$out.stores" >"$out.stores.json" 2>"$out.stores.err" &
        aux_pid=$!
    fi
    log "row 3: $cfg: $bs_str random writes, $lat_rate/s, QD $lat_qd at most, ${lat_secs}s$([[ $cfg == tidemark-stores ]] && echo ", a store point every ${store_every}s")"
    io_run "$out.writer.json" $((lat_secs + 60)) latency "$uri" --secs "$lat_secs" --qd "$lat_qd" --rate "$lat_rate" --bs "$bs" --out "$out.bin" ||
        add_note "$s" "row 3 ($cfg): the writer failed"
    if [[ -n $aux_pid ]]; then
        wait "$aux_pid" || add_note tidemark "row 3: store points failed: $(jq -c .errors "$out.stores.json" 2>/dev/null)"
        aux_pid=
    fi
    res[r3,$cfg,alloc]=$(du -k "$img" | awk '{ printf "%.1f", $1 / 1048576 }')
    stop_daemon "$s"
    rm -f "$img"
    local args=("$out.bin")
    [[ $cfg == tidemark-stores ]] && args+=("$out.stores")
    io_run "$tmp/lat-$cfg.json" "$op_timeout" analyze "${args[@]}" --after 1 || { add_note "$s" "row 3 ($cfg): analysis failed"; return 1; }
    res[r3,$cfg,iops]=$(jq .iops "$out.writer.json")
    log "row 3: $cfg: $(jq -c '{during: .during.p99, outside: .outside.p99, stores, store_mean}' "$tmp/lat-$cfg.json")"
}

row_pause() {
    lat_run tidemark-stores
    lat_run tidemark-none
    has_qsd && lat_run qsd
    return 0
}

# ---- the runs ---------------------------------------------------------------

t_runs=$EPOCHREALTIME
has iops && row_iops
has recovery && row_recovery
has pause && row_pause
t_runs=$(since "$t_runs")
log "runs done in ${t_runs}s"

# ---- report -------------------------------------------------------------------

commit=$(checkout_id)
hsize=$(numfmt --to=iec "$size")
loss() { # loss ON OFF -> (off - on) / off in %
    [[ -n ${1:-} && -n ${2:-} ]] || { echo n/a; return; }
    awk -v on="$1" -v off="$2" 'BEGIN { if (off > 0) printf "%.1f%%", 100 * (off - on) / off; else print "n/a" }'
}
c() { echo "${res[$1]:-n/a}"; }

cat <<EOF
## Intent log of persistent bitmaps: cost, recovery, store points

- host: $(nproc) CPUs, $(uname -sr), $(df --output=fstype "$tmp" | tail -n 1) under $(dirname "$tmp"), $(date -u '+%Y-%m-%d %H:%M UTC'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); runs took ${t_runs}s
- tidemark ($commit): \`tidemark daemon $tm_extra ...\`; $(ver qemu-storage-daemon --version): \`qemu-storage-daemon ...\`; otherwise the same command line: \`$daemon_line\`
- one daemon at a time; each used once it answers (NBD handshake, or QMP for the restarts), polled with a deadline
EOF

if has iops; then
    cat <<EOF

### 1. 4k random writes with one recording persistent bitmap

$hsize qcow2, 64 KiB clusters, \`preallocation=full\` (every write an overwrite: no allocation), bitmap \`b0\` (64 KiB granularity, cleared before each start), $((size / $(zone_bytes "$size"))) zones of $(numfmt --to=iec "$(zone_bytes "$size")"); $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine"; else echo "benches/randio.py"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s per run, the same seeded offsets in every run. Each daemon freshly started (sync, image read once before): **cold** = the first run after the open (every zone's first touch, one in-place header write + fdatasync per batch, is in it), then one write into each zone, then **warm** (all zones durable; no store point in between, interval ${store_interval}s). $( ((reps > 1)) && echo "Median of $reps rounds (alternating order).")

| IOPS | log off | log on | loss (on vs off) | qsd |
|---|---:|---:|---:|---:|
| cold | $(c r1,off,cold) | $(c r1,on,cold) | $(loss "${res[r1,on,cold]:-}" "${res[r1,off,cold]:-}") | $(c r1,qsd,cold) |
| warm | $(c r1,off,warm) | $(c r1,on,warm) | $(loss "${res[r1,on,warm]:-}" "${res[r1,off,warm]:-}") | $(c r1,qsd,warm) |
| daemon CPU µs per write, cold | $(c r1,off,coldcpu) | $(c r1,on,coldcpu) | | $(c r1,qsd,coldcpu) |
| daemon CPU µs per write, warm | $(c r1,off,warmcpu) | $(c r1,on,warmcpu) | | $(c r1,qsd,warmcpu) |
EOF
    if [[ $fsync_count != none ]]; then
        echo "| fsync + fdatasync calls during the cold load (untimed run, ${count_secs}s, $([[ $fsync_count == strace ]] && echo "\`strace -f --seccomp-bpf\`" || echo "TIDEMARK_IO_TRACE flush records")) | $(c r1,off,fsyncs) | $(c r1,on,fsyncs) | | |"
        echo "| … during the warm load (same run, after the touch) | $(c r1,off,fsyncs_warm) | $(c r1,on,fsyncs_warm) | | |"
    fi
    if ((reps > 1)); then
        echo
        printf 'Each round (IOPS, cold/warm):'
        for cfg in off on qsd; do
            [[ -n ${r1[$cfg,cold]:-} ]] || continue
            # shellcheck disable=SC2086 # the lists are meant to split
            printf ' %s %s;' "$([[ $cfg == qsd ]] && echo qsd || echo "log $cfg")" "$(paste -d/ <(printf '%s\n' ${r1[$cfg,cold]}) <(printf '%s\n' ${r1[$cfg,warm]:-}) | paste -sd' ')"
        done
        echo
    fi
    echo
    echo "Target: warm loss at most 3%. The counting runs are separate because tracing slows the writes (so their first touches batch differently: the count moves by ±10 from run to run)."
    [[ -n ${warm_late:-} ]] && echo "- warning: a periodic store point may have fallen within the warm run of:$warm_late (raise BENCH_STORE_INTERVAL or lower BENCH_RAND_SECS)"
fi

if has recovery; then
    cat <<EOF

### 2. Recovery after kill -9: $(numfmt --to=iec "$rec_size") qcow2, $rec_bitmaps persistent bitmaps

\`tidemark daemon\` (log on) took one 64 KiB write in each of $rec_zones random $(numfmt --to=iec "$(zone_bytes "$rec_size")") zones ($(c r2,scatter)s, QD 16), one flush, then SIGKILL. After the crash: $(c r2,crash_flags) bitmaps \`in-use\` on disk, \`qemu-img check\`: $(c r2,crash_check). The image was then copied (\`cp --sparse=always\`) for the restart.

| step | seconds | result |
|---|---:|---|
| \`tidemark bitmap --recover IMAGE\` (offline; process start to exit) | $(c r2,offline) | $(c r2,offline_n) bitmaps recovered, $(c r2,offline_added) bytes added to each; afterwards $(c r2,offline_inuse) in-use, \`qemu-img check\`: $(c r2,offline_check); $(c r2,covered) |
| daemon restart on the crashed copy: launch to a QMP answer listing the bitmaps (recovery at open) | $(c r2,restart) | $(c r2,restart_state); \`qemu-img check\` after its clean stop: $(c r2,restart_check) |
| the same image, clean restart (no recovery), reference | $(c r2,clean) | |
$(has_qsd && echo "| qsd restarted after the same writes and kill -9, reference | $(c r2,qsd_restart) | $(c r2,qsd_state) |")

Target: under 1 s. Recovery makes every marked zone dirty in every recording bitmap: $rec_zones × $(numfmt --to=iec "$(zone_bytes "$rec_size")") here, a superset of the $rec_zones × 64 KiB written. The restart time includes one python start-up of the poller (~35 ms), overlapped with the daemon's start.
EOF
fi

if has pause; then
    cat <<EOF

### 3. Write latency during store points

$(numfmt --to=iec "$lat_size") qcow2, $([[ $lat_prealloc == metadata ]] && echo "\`preallocation=metadata\` (every cluster allocated in qcow2, a hole in the host file: a write allocates nothing in qcow2, 4 KiB in ext4)" || echo "sparse (each write allocates a 64 KiB cluster)"), bitmap \`b0\` at $lat_gran granularity ($(numfmt --to=iec $((lat_size / $(to_bytes "$lat_gran") / 8))) of bits), fresh image per run; every zone written once first (untimed); then benches/intent_io.py: $bs_str random writes, $([[ $lat_rate == 0 ]] && echo "as fast as" || echo "$lat_rate per second,") QD $lat_qd at most, ${lat_secs}s, per-request latency (submit to completion, CLOCK_MONOTONIC). With store points: \`x-tidemark-bitmap-store {"node":"src"}\` every ${store_every}s from 2 s on, on one QMP connection; a request is *during* a store point when it overlaps the interval from sending the command to its reply.

| latency (ms) | requests | p50 | p99 | max |
|---|---:|---:|---:|---:|
EOF
    lrow() { # lrow LABEL CFG CLASS
        local f=$tmp/lat-$2.json
        if [[ -f $f ]]; then
            printf '| %s | %s | %s | %s | %s |\n' "$1" "$(jq ".$3.n" "$f")" "$(ms "$(jq ".$3.p50" "$f")")" "$(ms "$(jq ".$3.p99" "$f")")" "$(ms "$(jq ".$3.max" "$f")")"
        else
            printf '| %s | n/a | | | |\n' "$1"
        fi
    }
    lrow "tidemark, store points: requests during one" tidemark-stores during
    lrow "… outside them" tidemark-stores outside
    lrow "… of which started within 1 s after one (zones re-marked)" tidemark-stores after
    lrow "… the rest" tidemark-stores rest
    lrow "tidemark, no store points" tidemark-none outside
    has_qsd && lrow "qsd, reference" qsd outside
    f=$tmp/lat-tidemark-stores.json
    echo
    if [[ -f $f ]]; then
        echo "Store points: $(jq .stores "$f"), each $(ms "$(jq .store_mean "$f")") ms on average, at most $(ms "$(jq .store_max "$f")") ms (command to reply). Writer IOPS: with store points $(c r3,tidemark-stores,iops), without $(c r3,tidemark-none,iops)$(has_qsd && echo ", qsd $(c r3,qsd,iops)"); GiB allocated per run: $(c r3,tidemark-stores,alloc) / $(c r3,tidemark-none,alloc)$(has_qsd && echo " / $(c r3,qsd,alloc)")."
    fi
fi

echo
for s in tidemark qsd; do
    [[ -n ${note[$s]:-} ]] && echo "- $s: ${note[$s]}"
done
exit 0
