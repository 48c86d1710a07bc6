#!/usr/bin/env bash
# Backup jobs, tidemark daemon against qemu-storage-daemon (qsd): the same
# command line for both, one daemon at a time, QMP blockdev-backup timed from
# the command to BLOCK_JOB_COMPLETED, plus what a running backup costs guest
# writes (copy-before-write).  Prints a markdown table with absolute figures
# and tidemark / qsd ratios.  Progress goes to stderr, the report to stdout.
# See benches/README.md.  Shares its helpers with compare.sh and live.sh (benches/lib.sh);
# QMP through benches/qmp_job.py.
#
# Usage: benches/backup.sh             (from anywhere; builds tidemark first)
#
# Environment (all optional):
#   BENCH_SIZE=4G          virtual size of the fully allocated qcow2 source
#                          (rows 1, 2 and 4); multiple of 1 MiB
#   BENCH_INC_SIZE=64G     virtual size of the sparse source of the incremental row
#   BENCH_INC_EVERY=100    one 64 KiB cluster dirtied in every BENCH_INC_EVERY
#                          (100 = 1%), at a seeded random place in each group
#   BENCH_RAND_SECS=10     seconds of each random-write measurement (row 4)
#   BENCH_QD=16            random-write queue depth
#   BENCH_BS=4k            random-write request size
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists)
#   BENCH_CBW_TARGET=auto  target of row 4's backup: null-co, qcow2, or auto
#                          (null-co if every daemon accepted it in row 2)
#   BENCH_CBW_SPEED=auto   row 4's backup speed limit, bytes/s (suffixes ok);
#                          auto = BENCH_SIZE / (64 * BENCH_RAND_SECS)
#   BENCH_DAEMONS="qsd tidemark"   which daemons, in this order
#   BENCH_VERIFY=1         0: skip the qemu-img compare of each target with its source
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (images, sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default target/release/tidemark)
#   TIDEMARK_BASE_BIN=path another tidemark build, run as daemon tidemark-base
#                          (add it to BENCH_DAEMONS) for before/after rows
#   BENCH_START_TIMEOUT=30 seconds a daemon gets to answer NBD
#   BENCH_OP_TIMEOUT=600   seconds any one backup job (or QMP exchange) may take
#   BENCH_BUILD_TIMEOUT=600 seconds any one image-building qemu-io may take
#   BENCH_KEEP=1           keep the temp dir (images, daemon logs, QMP JSON)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

# shellcheck source=benches/lib.sh
. "$here/lib.sh"
daemon_knobs   # the knobs live.sh takes too: BENCH_SIZE ... TIDEMARK_BIN

inc_size_str=${BENCH_INC_SIZE:-64G}
inc_every=${BENCH_INC_EVERY:-100}
cbw_target=${BENCH_CBW_TARGET:-auto}
cbw_speed_str=${BENCH_CBW_SPEED:-auto}
cluster=65536         # every image's cluster size, the bitmap granularity, the dirty write size

inc_size=$(to_bytes "$inc_size_str") || die "bad BENCH_INC_SIZE: $inc_size_str"
[[ $inc_every =~ ^[1-9][0-9]*$ ]] || die "BENCH_INC_EVERY must be a positive integer"
((inc_size % cluster == 0 && inc_size / cluster >= inc_every)) || die "BENCH_INC_SIZE too small or not a multiple of 64 KiB"
cbw_speed=$(job_speed BENCH_CBW_SPEED "$cbw_speed_str") || exit 1
[[ $cbw_target =~ ^(auto|null-co|qcow2)$ ]] || die "BENCH_CBW_TARGET must be auto, null-co or qcow2"
select_randio

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-backup-bench.XXXXXX") || die "mktemp failed"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

n_dirty=$((inc_size / cluster / inc_every))
# source + one full qcow2 target at a time + the incremental source and target
need=$((2 * size + 2 * n_dirty * cluster + (1 << 30)))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

src=$tmp/source.qcow2   # BENCH_SIZE, every cluster written with random-ish data
inc=$tmp/inc.qcow2      # BENCH_INC_SIZE, empty; made afresh for each daemon

# ---- tidemark build ------------------------------------------------------

declare -A note    # per-daemon reasons for n/a cells and anomalies
build_tidemark

# ---- the source image ------------------------------------------------------

make_source "$src"

# The incremental row's dirty writes: one cluster at a seeded random place in
# every group of BENCH_INC_EVERY, each with its own (seeded) byte pattern, as
# many in flight as qemu-io allows between flushes.
awk -v n="$n_dirty" -v every="$inc_every" -v c="$cluster" 'BEGIN {
    srand(1)
    for (i = 0; i < n; i++) {
        printf "aio_write -q -P %d %.0f %d\n", 1 + int(rand() * 255), (i * every + int(rand() * every)) * c, c
        if ((i + 1) % 64 == 0) print "aio_flush"
    }
    print "aio_flush"
}' >"$tmp/dirty.cmds"

# ---- daemons ---------------------------------------------------------------

serve_img=
server_cmd() { # server_cmd NAME SOCKET: sets cmd (and qmp, the monitor socket); serves $serve_img
    daemon_cmd "$1" "$2" --blockdev "driver=file,node-name=srcf,filename=$(qemu_opt "$serve_img")" \
        --blockdev "driver=qcow2,node-name=src,file=srcf"
}

# Before each daemon start: write back what the previous one left dirty, and
# read the source once, so that every daemon starts with the same warm cache.
prepare_cache() {
    sync
    cat "$src" >/dev/null
}

# Checks a finished job's BLOCK_JOB_COMPLETED data in OUT: offset == len == WANT.
check_done() { # check_done SERVER ROW OUT WANT
    local off len
    off=$(jq -r '.event.offset' "$3") len=$(jq -r '.event.len' "$3")
    [[ $off == "$4" && $len == "$4" ]] ||
        add_note "$1" "$2: BLOCK_JOB_COMPLETED has offset $off, len $len, expected $4 for both"
}

# ---- rows: each sets v (or why) --------------------------------------------

declare -A nullco   # nullco[SERVER]=yes|no: blockdev-add of a null-co node
declare -A cbw_done # cbw_done[SERVER]: how far row 4's backup got during the load

# full backup of the source into a fresh KIND target (qcow2 or null-co), MiB/s
full_backup() { # full_backup SERVER KIND ROW
    local t=$tmp/target-$1.qcow2 out=$tmp/$1-$3.json
    v='' why=''
    if [[ $2 == qcow2 ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=$cluster "$t" "$size" || { why="qemu-img create failed"; return 1; }
    fi
    sync
    if ! qmp_run "$out" -c "blockdev-add $(target_args "$2" "t-$3" "$size" "$t")" \
        -t "blockdev-backup {\"job-id\":\"$3\",\"device\":\"src\",\"target\":\"t-$3\",\"sync\":\"full\"}" \
        -w "BLOCK_JOB_COMPLETED:$3" -c "blockdev-del {\"node-name\":\"t-$3\"}"; then
        why=$qerr
        [[ $2 == null-co && $qerr == blockdev-add:* ]] && nullco[$1]=no
        rm -f "$t"
        return 1
    fi
    [[ $2 == null-co ]] && nullco[$1]=yes
    check_done "$1" "$3" "$out" "$size"
    if [[ $2 == qcow2 ]] && ! same_image "$src" "$t"; then
        why="the target differs from the source (qemu-img compare)"
        rm -f "$t"
        return 1
    fi
    rm -f "$t"
    v=$(awk -v b="$size" -v s="$(jq -r .secs "$out")" 'BEGIN { printf "%.0f", b / 1048576 / s }')
    jq -r '.events | join(" ")' "$out" >"$tmp/$1-events.txt"
}

# incremental backup of the dirtied sparse source, seconds; the daemon serves
# $inc, b0 was added at start and the dirty writes are done
inc_backup() { # inc_backup SERVER
    local t=$tmp/inc-target-$1.qcow2 out=$tmp/$1-inc.json
    v='' why=''
    qemu-img create -q -f qcow2 -o cluster_size=$cluster "$t" "$inc_size" || { why="qemu-img create failed"; return 1; }
    sync
    if ! qmp_run "$out" -c "blockdev-add $(target_args qcow2 t-inc "$inc_size" "$t")" \
        -t 'blockdev-backup {"job-id":"inc","device":"src","target":"t-inc","sync":"incremental","bitmap":"b0"}' \
        -w BLOCK_JOB_COMPLETED:inc -c 'blockdev-del {"node-name":"t-inc"}'; then
        why=$qerr
        rm -f "$t"
        return 1
    fi
    check_done "$1" incremental "$out" $((n_dirty * cluster))
    # The source holds nothing but the dirty clusters, so a correct
    # incremental target equals it.
    if ! same_image "$inc" "$t"; then
        why="the target differs from the source (qemu-img compare)"
    else
        got=$(allocated "$t") && ((got != n_dirty)) &&
            add_note "$1" "incremental: the target has $got clusters allocated, expected $n_dirty"
        v=$(jq -r '.secs | . * 1000 | round / 1000' "$out")
    fi
    rm -f "$t"
    [[ -n $v ]]
}

# ---- the runs ------------------------------------------------------------

rows=(full_qcow2 full_null incremental cbw_without cbw_during cbw_ratio)
declare -A res      # res[server,row]
t_runs=$EPOCHREALTIME

# Pass 1: rows 1 to 3, one daemon at a time.
for s in $servers; do
    [[ $s == tidemark && -n $build_failed ]] && { log "tidemark: skipped (${note[tidemark]})"; continue; }

    serve_img=$src
    if start_daemon "$s" full "the $size_str source"; then
        log "$s: full backup into a fresh qcow2"
        full_backup "$s" qcow2 full_qcow2; record "$s" full_qcow2
        log "$s: full backup into null-co"
        full_backup "$s" null-co full_null
        if [[ ${nullco[$s]:-} == no ]]; then
            log "$s: full_null n/a: $why"
            add_note "$s" "null-co n/a ($why)"
        else
            record "$s" full_null
        fi
        stop_daemon "$s"
    else
        continue
    fi

    log "$s: starting on a fresh $inc_size_str sparse source"
    rm -f "$inc"
    qemu-img create -q -f qcow2 -o cluster_size=$cluster "$inc" "$inc_size" || die "qemu-img create $inc failed"
    prepare_cache
    serve_img=$inc
    if start_server "$s" inc; then
        v='' why=''
        if ! qmp_run "$tmp/$s-bitmap.json" -c "block-dirty-bitmap-add {\"node\":\"src\",\"name\":\"b0\",\"granularity\":$cluster}"; then
            why=$qerr
        else
            log "$s: dirtying $n_dirty clusters of 64 KiB through NBD (setup)"
            if ! qemu_io "$tmp/dirty.cmds" -f raw "$uri"; then
                why="dirty writes through NBD failed"
            else
                sync
                log "$s: incremental backup"
                inc_backup "$s"
            fi
        fi
        record "$s" incremental
        stop_daemon "$s"
    else
        log "$s: ${note[$s]}"
    fi
    rm -f "$inc"
done

if [[ $cbw_target == auto ]]; then
    cbw_target=null-co
    for s in $servers; do
        [[ ${nullco[$s]:-} == no ]] && cbw_target=qcow2
    done
fi
log "copy-before-write rows: backup into $cbw_target at $(numfmt --to=iec "$cbw_speed")/s"

# Pass 2: row 4, one daemon at a time.
for s in $servers; do
    [[ $s == tidemark && -n $build_failed ]] && continue
    serve_img=$src
    start_daemon "$s" cbw "the $size_str source" || continue

    log "$s: $bs_str random writes, QD $qd, no backup"
    v='' why=''
    rand_io write || v=
    why="random writes failed"; record "$s" cbw_without

    t=$tmp/cbw-target-$s.qcow2
    [[ $cbw_target == qcow2 ]] && { qemu-img create -q -f qcow2 -o cluster_size=$cluster "$t" "$size" || die "qemu-img create failed"; }
    sync
    v='' why=''
    if qmp_run "$tmp/$s-cbw-start.json" -c "blockdev-add $(target_args "$cbw_target" t-cbw "$size" "$t")" \
        -c "blockdev-backup {\"job-id\":\"cbw\",\"device\":\"src\",\"target\":\"t-cbw\",\"sync\":\"full\",\"speed\":$cbw_speed}"; then
        log "$s: $bs_str random writes, QD $qd, during the backup"
        rand_io write || { v=; why="random writes failed"; }
        # Is the job still running? Only then did the whole load run during it.
        if qmp_run "$tmp/$s-cbw-query.json" -c query-block-jobs; then
            job=$(jq -c '.returns[0][] | select(.device == "cbw")' "$tmp/$s-cbw-query.json")
            if [[ -z $job ]]; then
                [[ -n $v ]] && why="the backup ended before the load did (lower BENCH_CBW_SPEED or BENCH_RAND_SECS, or raise BENCH_SIZE)"
                v=
            else
                cbw_done[$s]=$(jq -r '"offset \(.offset) of len \(.len), status \(.status)"' <<<"$job")
                # It may complete on its own between the query and the cancel.
                if ! qmp_run "$tmp/$s-cbw-cancel.json" -c 'block-job-cancel {"device":"cbw"}' -w BLOCK_JOB_CANCELLED:cbw; then
                    if [[ $qerr == *"not found"* ]]; then
                        log "$s: the backup completed right after the load"
                    else
                        add_note "$s" "cancelling the row-4 backup: $qerr"
                    fi
                fi
            fi
        else
            v='' why="query-block-jobs: $qerr"
        fi
        qmp_run "$tmp/$s-cbw-del.json" -c 'blockdev-del {"node-name":"t-cbw"}' ||
            add_note "$s" "blockdev-del of the row-4 target: $qerr"
    else
        why=$qerr
    fi
    record "$s" cbw_during
    rm -f "$t"
    ratio_row "$s" cbw_ratio cbw_during cbw_without
    stop_daemon "$s"
done
t_runs=$(secs_since "$t_runs")
log "runs done in ${t_runs}s"

# ---- report --------------------------------------------------------------

commit=$(checkout_id)

declare -A label=(
    [full_qcow2]="full backup of the $(numfmt --to=iec "$size") qcow2 → fresh qcow2 (MiB/s)"
    [full_null]="full backup of the same → null-co (MiB/s)"
    [incremental]="incremental backup, $(numfmt --to=iec "$inc_size") sparse, $n_dirty dirty 64 KiB clusters → fresh qcow2 (s, lower is better)"
    [cbw_without]="$bs_str random write via NBD, QD $qd, no backup (IOPS)"
    [cbw_during]="the same during a sync=full backup → $cbw_target at $(numfmt --to=iec "$cbw_speed")/s (IOPS)"
    [cbw_ratio]="during / without (copy-before-write cost; 1 = none)"
)

cat <<EOF
## Backup jobs: tidemark vs qemu-storage-daemon

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)
- source ($(df --output=fstype "$tmp" | tail -n 1), 64 KiB clusters, built in ${t_build}s): $(numfmt --to=iec "$size") qcow2, every cluster written (a 64 MiB random chunk repeated);
  incremental: a fresh empty $(numfmt --to=iec "$inc_size") qcow2 per daemon, bitmap b0 (64 KiB) added at start with block-dirty-bitmap-add, then $n_dirty 64 KiB writes (one at a seeded random place in every $inc_every clusters, seeded patterns) through the NBD export with qemu-io (untimed)
- daemons run one at a time, in this order: $servers (rows 1-3 for each, then row 4 for each; runs took ${t_runs}s); each start on fresh sockets; before each start: sync, then the source read once
- same command line for both: \`$daemon_line\`
  - tidemark ($commit): \`target/release/tidemark daemon ...\`
  - $(ver qemu-storage-daemon --version): \`qemu-storage-daemon ...\`
- backup rows: QMP (benches/qmp_job.py) \`blockdev-add\` of the target (a fresh \`qemu-img create\` qcow2, or null-co with read-zeroes=off), untimed; then timed from sending \`blockdev-backup\` (sync=full, or sync=incremental bitmap=b0) to BLOCK_JOB_COMPLETED; $([[ $verify == 1 ]] && echo "each qcow2 target then compared with its source (qemu-img compare), a mismatch makes the cell n/a" || echo "targets not verified (BENCH_VERIFY=0)")
- row 4: $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine"; else echo "benches/randio.py (python3-libnbd aio)"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s, uniform over the whole source; first without a job, then right after \`blockdev-backup sync=full speed=$cbw_speed\` into $cbw_target (then cancelled); the first write to each 64 KiB cluster copies it out first, so the cost falls as the load goes on

EOF
qsd_table "${rows[@]}"
echo
echo "Ratios are tidemark / qsd: above 1x is better for MiB/s, IOPS and during / without, below 1x for seconds."
echo
for s in qsd tidemark; do
    [[ -n ${cbw_done[$s]:-} ]] || continue
    printf -- '- %s: row-4 job when the load ended: %s' "$s" "${cbw_done[$s]}"
    [[ -n ${res[$s,cbw_during]:-} ]] &&
        awk -v i="${res[$s,cbw_during]}" -v t="$rand_secs" -v n=$((size / cluster)) \
            'BEGIN { printf "; %.1f writes per 64 KiB cluster during the load", i * t / n }'
    echo
done
for s in qsd tidemark; do
    [[ -f $tmp/$s-events.txt ]] && echo "- $s: events of the full qcow2 backup: $(cat "$tmp/$s-events.txt")"
done
daemon_notes
exit 0
