#!/usr/bin/env bash
# Live block jobs, tidemark daemon against qemu-storage-daemon (qsd): the same
# command line for both, one daemon at a time, driven over QMP with
# benches/qmp_job.py:
#   (a) blockdev-mirror (or drive-mirror) sync=full of a fully allocated qcow2
#       into a fresh qcow2: seconds to BLOCK_JOB_READY, then job-complete to
#       BLOCK_JOB_COMPLETED, and MiB/s over both;
#   (b) active block-commit of an allocated overlay into its base: the same
#       three figures;
#   (c) 4k random-write IOPS through the NBD export without a job, during a
#       speed-limited mirror in copy-mode=background, and during one in
#       copy-mode=write-blocking (every guest write also written to the target
#       before it is acknowledged).
# Prints a markdown table with absolute figures and tidemark / qsd ratios.
# Progress goes to stderr, the report to stdout. See benches/README.md.
#
# Usage: benches/live.sh                    (from anywhere; builds tidemark first)
#        BENCH_DAEMONS=qsd benches/live.sh  (qsd alone: checks the bench itself)
#
# Environment (all optional):
#   BENCH_SIZE=4G          virtual size of the fully allocated qcow2 source
#                          (rows a and c, and the base of row b); multiple of 1 MiB
#   BENCH_COMMIT_SIZE=2G   bytes allocated in row b's overlay: 1 MiB pieces spread
#                          evenly over BENCH_SIZE; a multiple of 1 MiB that divides
#                          into BENCH_SIZE in 64 KiB-aligned strides
#   BENCH_MIRROR=blockdev  row a: blockdev (blockdev-add of a qemu-img-created
#                          target, untimed, then blockdev-mirror) or drive
#                          (drive-mirror creates the target itself, timed)
#   BENCH_RAND_SECS=10     seconds of each random-write measurement (row c)
#   BENCH_QD=16            random-write queue depth
#   BENCH_BS=4k            random-write request size
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists)
#   BENCH_WB_TARGET=qcow2  row c's mirror target: qcow2 (fresh file) or null-co
#   BENCH_WB_SPEED=auto    row c's mirror speed limit, bytes/s (suffixes ok);
#                          auto = BENCH_SIZE / (64 * BENCH_RAND_SECS)
#   BENCH_ROWS="mirror commit wb"  which row groups, in this order
#   BENCH_DAEMONS="qsd tidemark"   which daemons, in this order (tidemark-base:
#                          TIDEMARK_BASE_BIN, for before/after rows)
#   BENCH_VERIFY=1         0: skip the qemu-img compares of targets and bases
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (images, sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default target/release/tidemark)
#   TIDEMARK_BASE_BIN=path another tidemark build, run as daemon tidemark-base
#   BENCH_START_TIMEOUT=30 seconds a daemon gets to answer NBD
#   BENCH_OP_TIMEOUT=600   seconds any one job phase (or QMP exchange) may take
#   BENCH_BUILD_TIMEOUT=600 seconds any one image-building qemu-io may take
#   BENCH_KEEP=1           keep the temp dir (images, daemon logs, QMP JSON)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

# shellcheck source=benches/lib.sh
. "$here/lib.sh"
daemon_knobs   # the knobs backup.sh takes too: BENCH_SIZE ... TIDEMARK_BIN

commit_size_str=${BENCH_COMMIT_SIZE:-2G}
mirror_kind=${BENCH_MIRROR:-blockdev}
wb_target=${BENCH_WB_TARGET:-qcow2}
wb_speed_str=${BENCH_WB_SPEED:-auto}
groups=${BENCH_ROWS:-mirror commit wb}
cluster=65536         # every image's cluster size
piece=$((1 << 20))    # row b's overlay is written in pieces of this size

commit_size=$(to_bytes "$commit_size_str") || die "bad BENCH_COMMIT_SIZE: $commit_size_str"
[[ $mirror_kind =~ ^(blockdev|drive)$ ]] || die "BENCH_MIRROR must be blockdev or drive"
[[ $wb_target =~ ^(qcow2|null-co)$ ]] || die "BENCH_WB_TARGET must be qcow2 or null-co"
for g in $groups; do [[ $g =~ ^(mirror|commit|wb)$ ]] || die "BENCH_ROWS: unknown row group $g (mirror, commit, wb)"; done
n_pieces=$((commit_size / piece))
((commit_size % piece == 0 && n_pieces >= 1 && commit_size <= size && size % n_pieces == 0 &&
    size / n_pieces % cluster == 0)) ||
    die "BENCH_COMMIT_SIZE must be a multiple of 1 MiB, at most BENCH_SIZE, and split BENCH_SIZE into 64 KiB-aligned strides"
stride=$((size / n_pieces))
wb_speed=$(job_speed BENCH_WB_SPEED "$wb_speed_str") || exit 1
[[ " $groups " == *" wb "* ]] && select_randio
has() { [[ " $groups " == *" $1 "* ]]; }

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-live-bench.XXXXXX") || die "mktemp failed"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# the source, a full mirror target, the overlay; row c's target stays small
need=$((2 * size + commit_size + (1 << 30)))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

src=$tmp/source.qcow2    # BENCH_SIZE, every cluster written; also row b's base
ovl=$tmp/overlay.qcow2   # row b: over $src, BENCH_COMMIT_SIZE written; made afresh per daemon

# ---- tidemark build ------------------------------------------------------

declare -A note    # per-daemon reasons for n/a cells and anomalies
build_tidemark

# ---- images ----------------------------------------------------------------

make_source "$src"

# make_overlay: a fresh overlay over $src with one 1 MiB piece at the start of
# every stride, all from a new random 1 MiB (so that it differs from what the
# base holds there, whoever committed into it before), cache=unsafe, untimed.
make_overlay() {
    rm -f "$ovl"
    qemu-img create -q -f qcow2 -o cluster_size=$cluster -b "$src" -F qcow2 "$ovl" || return 1
    head -c "$piece" /dev/urandom >"$tmp/piece"
    awk -v n="$n_pieces" -v stride="$stride" -v p="$piece" -v f="$tmp/piece" \
        'BEGIN { for (i = 0; i < n; i++) printf "write -q -s %s %.0f %d\n", f, i * stride, p }' >"$tmp/ovl.cmds"
    qemu_io "$tmp/ovl.cmds" -t unsafe -f qcow2 "$ovl" || return 1
    rm -f "$tmp/piece" "$tmp/ovl.cmds"
    got=$(allocated "$ovl") || return 1
    ((got == commit_size / cluster)) || { log "$ovl has $got clusters allocated, expected $((commit_size / cluster))"; return 1; }
    sync
}

# ---- daemons ---------------------------------------------------------------

layout=plain   # plain: the source alone; chain: the overlay over the source (row b)
server_cmd() { # server_cmd NAME SOCKET: sets cmd (and qmp, the monitor socket)
    if [[ $layout == plain ]]; then
        daemon_cmd "$1" "$2" --blockdev "driver=file,node-name=srcf,filename=$(qemu_opt "$src")" \
            --blockdev "driver=qcow2,node-name=src,file=srcf"
    else
        daemon_cmd "$1" "$2" --blockdev "driver=file,node-name=basef,filename=$(qemu_opt "$src")" \
            --blockdev "driver=qcow2,node-name=base,file=basef" \
            --blockdev "driver=file,node-name=topf,filename=$(qemu_opt "$ovl")" \
            --blockdev "driver=qcow2,node-name=src,file=topf,backing=base"
    fi
}
chain_line="--blockdev driver=file,node-name=basef,filename=IMG --blockdev driver=qcow2,node-name=base,file=basef --blockdev driver=file,node-name=topf,filename=OVERLAY --blockdev driver=qcow2,node-name=src,file=topf,backing=base"

# Before each daemon start: write back what the previous one left dirty, and
# read the images once, so that every daemon starts with the same warm cache.
prepare_cache() {
    sync
    cat "$src" >/dev/null
    [[ $layout == chain ]] && cat "$ovl" >/dev/null
    return 0
}

secs_of() { jq -r '.secs' "$1"; }
mibps_of() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", b / 1048576 / s }'; }
round3() { awk -v s="$1" 'BEGIN { printf "%.3f", s }'; }

# ready_complete SERVER ROW JOB START-CMD: START-CMD (timed) until
# BLOCK_JOB_READY, then job-complete (timed, on a new connection) until
# BLOCK_JOB_COMPLETED. Sets ready_s and done_s, or why; notes an
# offset != len at completion.
ready_complete() {
    local out1=$tmp/$1-$2-ready.json out2=$tmp/$1-$2-complete.json off len
    ready_s='' done_s=''
    if ! qmp_run "$out1" -t "$4" -w "BLOCK_JOB_READY:$3"; then
        why=$qerr
        return 1
    fi
    ready_s=$(secs_of "$out1")
    if ! qmp_run "$out2" -t "job-complete {\"id\":\"$3\"}" -w "BLOCK_JOB_COMPLETED:$3"; then
        why=$qerr
        return 1
    fi
    done_s=$(secs_of "$out2")
    off=$(jq -r '.event.offset' "$out2") len=$(jq -r '.event.len' "$out2")
    [[ $off == "$len" ]] || add_note "$1" "$2: BLOCK_JOB_COMPLETED has offset $off != len $len"
    # the events of both phases, for the report
    jq -rs '[.[].events[]] | join(" ")' "$out1" "$out2" >"$tmp/$1-$2-events.txt"
}

# ---- rows ------------------------------------------------------------------

declare -A res      # res[server,row]
declare -A wb_state # wb_state[SERVER,MODE]: the row-c job when its load ended

# (a) mirror of the source into a fresh qcow2
mirror_rows() { # mirror_rows SERVER
    local t=$tmp/mirror-target-$1.qcow2 start
    rm -f "$t"
    why=''
    if [[ $mirror_kind == blockdev ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=$cluster "$t" "$size" || { why="qemu-img create failed"; return 1; }
        qmp_run "$tmp/$1-mirror-add.json" -c "blockdev-add $(target_args qcow2 t-mirror "$size" "$t")" ||
            { why=$qerr; rm -f "$t"; return 1; }
        start='blockdev-mirror {"job-id":"mirror","device":"src","target":"t-mirror","sync":"full"}'
    else
        start=$(jq -cn --arg t "$t" '{"job-id": "mirror", device: "src", target: $t, format: "qcow2",
            sync: "full", mode: "absolute-paths", "node-name": "t-mirror"}')
        start="drive-mirror $start"
    fi
    sync
    ready_complete "$1" mirror mirror "$start" || { rm -f "$t"; return 1; }
    # After the pivot the export writes to the target; the source is left as it was.
    if ! same_image "$src" "$t"; then
        why="the target differs from the source (qemu-img compare)"
        rm -f "$t"
        return 1
    fi
    rm -f "$t"
}

# (b) active commit of the overlay into the source; the daemon serves the chain
commit_rows() { # commit_rows SERVER
    why=''
    ready_complete "$1" commit commit 'block-commit {"job-id":"commit","device":"src"}' || return 1
    # The overlay still reads the same (its pieces, the base elsewhere), so the
    # base must now equal it; the pieces differ from what the base held before.
    if ! same_image "$src" "$ovl"; then
        why="the base differs from the overlay chain after the commit (qemu-img compare)"
        return 1
    fi
}

# job_group SERVER GROUP BYTES WHAT DOES: the row group of a job that reaches
# READY (GROUP mirror or commit): the daemon started on WHAT, the group's
# rows (mirror_rows or commit_rows, which DOES), then the rows GROUP_ready,
# GROUP_complete and GROUP_mibps (BYTES over both phases).
job_group() {
    local ok
    start_daemon "$1" "$2" "$4" || return 0
    log "$1: $5"
    case $2 in
    mirror) mirror_rows "$1" ;;
    commit) commit_rows "$1" ;;
    esac
    ok=$?
    if ((ok == 0)); then
        v=$(round3 "$ready_s"); record "$1" "${2}_ready"
        v=$(round3 "$done_s"); record "$1" "${2}_complete"
        v=$(mibps_of "$3" "$(awk -v a="$ready_s" -v b="$done_s" 'BEGIN { print a + b }')"); record "$1" "${2}_mibps"
    else
        v=''; record "$1" "${2}_ready"
    fi
    stop_daemon "$1"
}

# (c) random writes during a speed-limited mirror in copy-mode MODE
wb_during() { # wb_during SERVER MODE
    local t=$tmp/wb-target-$1.qcow2 job args
    v='' why=''
    rm -f "$t"
    if [[ $wb_target == qcow2 ]]; then
        qemu-img create -q -f qcow2 -o cluster_size=$cluster "$t" "$size" || { why="qemu-img create failed"; return 1; }
    fi
    sync
    args=$(jq -cn --arg m "$2" --argjson s "$wb_speed" \
        '{"job-id": "wb", device: "src", target: "t-wb", sync: "full", "copy-mode": $m, speed: $s}')
    if ! qmp_run "$tmp/$1-wb-$2-start.json" -c "blockdev-add $(target_args "$wb_target" t-wb "$size" "$t")" \
        -c "blockdev-mirror $args"; then
        why=$qerr
        qmp_run "$tmp/$1-wb-$2-del.json" -c 'blockdev-del {"node-name":"t-wb"}'
        rm -f "$t"
        return 1
    fi
    log "$1: $bs_str random writes, QD $qd, during a copy-mode=$2 mirror"
    rand_io write || { v=; why="random writes failed"; }
    # Was the job still copying? Only then did the whole load run during it.
    if qmp_run "$tmp/$1-wb-$2-query.json" -c query-block-jobs; then
        job=$(jq -c '.returns[0][] | select(.device == "wb")' "$tmp/$1-wb-$2-query.json")
        if [[ -z $job ]]; then
            v='' why="the mirror job was gone when the load ended"
        else
            wb_state[$1,$2]=$(jq -r '"status \(.status), offset \(.offset) of len \(.len)" +
                (if has("actively-synced") then ", actively-synced \(."actively-synced")" else "" end)' <<<"$job")
            if [[ $(jq -r .status <<<"$job") != running ]]; then
                [[ -n $v ]] && why="the mirror was not copying any more when the load ended (status $(jq -r .status <<<"$job")): lower BENCH_WB_SPEED or BENCH_RAND_SECS"
                v=
            fi
            # force: a READY mirror is abandoned (BLOCK_JOB_CANCELLED), not completed
            qmp_run "$tmp/$1-wb-$2-cancel.json" -c 'block-job-cancel {"device":"wb","force":true}' -w BLOCK_JOB_CANCELLED:wb ||
                add_note "$1" "cancelling the copy-mode=$2 mirror: $qerr"
        fi
    else
        v='' why="query-block-jobs: $qerr"
    fi
    qmp_run "$tmp/$1-wb-$2-del.json" -c 'blockdev-del {"node-name":"t-wb"}' ||
        add_note "$1" "blockdev-del of the copy-mode=$2 target: $qerr"
    rm -f "$t"
    [[ -n $v ]]
}

# ---- the runs ------------------------------------------------------------

t_runs=$EPOCHREALTIME
for s in $servers; do
    [[ $s == tidemark && -n $build_failed ]] && { log "tidemark: skipped (${note[tidemark]})"; continue; }

    if has mirror; then
        layout=plain
        job_group "$s" mirror "$size" "the $size_str source" "$mirror_kind-mirror sync=full into a fresh qcow2"
    fi

    if has commit; then
        layout=chain
        log "$s: a fresh overlay with $commit_size_str allocated (setup)"
        make_overlay || die "could not build $ovl"
        job_group "$s" commit "$commit_size" "the overlay over the source" "active block-commit of the overlay"
        rm -f "$ovl"
        layout=plain
    fi

    if has wb; then
        layout=plain
        if start_daemon "$s" wb "the $size_str source"; then
            log "$s: $bs_str random writes, QD $qd, no job"
            v='' why=''
            rand_io write || v=
            why="random writes failed"; record "$s" wb_without
            for mode in background write-blocking; do
                wb_during "$s" "$mode"; record "$s" "wb_$mode"
                ratio_row "$s" "wb_${mode}_ratio" "wb_$mode" wb_without
            done
            stop_daemon "$s"
        fi
    fi
done
t_runs=$(secs_since "$t_runs")
log "runs done in ${t_runs}s"

# ---- report --------------------------------------------------------------

commit=$(checkout_id)

hsize=$(numfmt --to=iec "$size") hcommit=$(numfmt --to=iec "$commit_size") hspeed=$(numfmt --to=iec "$wb_speed")
declare -A label=(
    [mirror_ready]="$mirror_kind-mirror sync=full, $hsize allocated qcow2 → fresh qcow2: to BLOCK_JOB_READY (s, lower is better)"
    [mirror_complete]="… job-complete to BLOCK_JOB_COMPLETED (s, lower is better)"
    [mirror_mibps]="… MiB/s over both"
    [commit_ready]="active block-commit, $hcommit allocated overlay → its $hsize base: to BLOCK_JOB_READY (s, lower is better)"
    [commit_complete]="… job-complete to BLOCK_JOB_COMPLETED (s, lower is better)"
    [commit_mibps]="… MiB/s over both"
    [wb_without]="$bs_str random write via NBD, QD $qd, no job (IOPS)"
    [wb_background]="the same during blockdev-mirror copy-mode=background → $wb_target at $hspeed/s (IOPS)"
    [wb_background_ratio]="background / without"
    [wb_write-blocking]="the same during blockdev-mirror copy-mode=write-blocking → $wb_target at $hspeed/s (IOPS)"
    [wb_write-blocking_ratio]="write-blocking / without (1 = the synchronous target write costs nothing)"
)
rows=()
has mirror && rows+=(mirror_ready mirror_complete mirror_mibps)
has commit && rows+=(commit_ready commit_complete commit_mibps)
has wb && rows+=(wb_without wb_background wb_background_ratio wb_write-blocking wb_write-blocking_ratio)

cat <<EOF
## Live block jobs: tidemark vs qemu-storage-daemon

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)
- source ($(df --output=fstype "$tmp" | tail -n 1), 64 KiB clusters, built in ${t_build}s): $hsize qcow2, every cluster written (a 64 MiB random chunk repeated)
- daemons run one at a time, in this order: $servers (row groups $groups for each; runs took ${t_runs}s); a fresh start on fresh sockets for each group; before each start: sync, then the images read once
- same command line for both: \`$daemon_line\`; for the commit rows the two source --blockdev options are \`$chain_line\`
  - tidemark ($commit): \`target/release/tidemark daemon ...\`
  - $(ver qemu-storage-daemon --version): \`qemu-storage-daemon ...\`
- QMP through benches/qmp_job.py; each phase timed from sending the command to its event; the two phases on separate connections (the gap between them, untimed, is about one python start-up)
- mirror: $([[ $mirror_kind == blockdev ]] && echo "target made by \`qemu-img create\` and \`blockdev-add\`ed (untimed), then \`blockdev-mirror sync=full\`" || echo "\`drive-mirror sync=full mode=absolute-paths format=qcow2\` (the daemon creates the target: timed)"); after the pivot the target is $([[ $verify == 1 ]] && echo "compared with the source (qemu-img compare)" || echo "not verified (BENCH_VERIFY=0)")
- commit: a fresh overlay per daemon (\`qemu-img create -b\`), $n_pieces pieces of 1 MiB, one every $(numfmt --to=iec "$stride"), from a new random 1 MiB; \`block-commit\` with top = the active layer; the base is then $([[ $verify == 1 ]] && echo "compared with the overlay chain" || echo "not verified")
- random writes: $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine"; else echo "benches/randio.py (python3-libnbd aio)"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s, uniform over the whole source; first without a job, then right after \`blockdev-mirror sync=full speed=$wb_speed\` into a fresh $wb_target target, once per copy-mode (then \`block-job-cancel force=true\`); a cell is n/a unless the job is still \`running\` (not ready) when the load ends

EOF
qsd_table "${rows[@]}"
echo
echo "Ratios are tidemark / qsd: above 1x is better for MiB/s, IOPS and the during / without rows, below 1x for seconds."
echo
for s in qsd tidemark tidemark-base; do
    for mode in background write-blocking; do
        [[ -n ${wb_state[$s,$mode]:-} ]] && echo "- $s: the copy-mode=$mode mirror when the load ended: ${wb_state[$s,$mode]}"
    done
done
for s in qsd tidemark tidemark-base; do
    for g in mirror commit; do
        [[ -f $tmp/$s-$g-events.txt ]] && echo "- $s: events of the $g job: $(cat "$tmp/$s-$g-events.txt")"
    done
done
daemon_notes
exit 0
