#!/usr/bin/env bash
# Pull-mode backup, tidemark daemon against qemu-storage-daemon (qsd): the
# same command line for both, one daemon at a time; the qsd side gets the
# QMP sequence libvirt sends for a pull backup, tidemark one
# x-tidemark-backup-begin; both driven by the same client (benches/pull.py):
#   (a) pull: a fully allocated BENCH_SIZE qcow2 is fleeced (scratch qcow2
#       backed by the live disk, blockdev-backup sync=none, read-only export
#       of the scratch) and pulled with nbdcopy to null: while a rate-limited
#       random writer (BENCH_WRITE_IOPS, 4 KiB) writes through the live
#       export: seconds of the pull, and the scratch file's allocated bytes
#       when it ends;
#   (b) begin: BENCH_DISKS small qcow2 disks with a checkpoint bitmap; an
#       incremental session of all of them with a new checkpoint: time from
#       sending the first command to the first 512 bytes read from every
#       export (median of BENCH_REPS).
# Prints a markdown table with absolute figures and tidemark / qsd ratios.
# Progress goes to stderr, the report to stdout. See benches/README.md.
#
# Usage: benches/pull.sh                    (from anywhere; builds tidemark first)
#        BENCH_SIZE=256M BENCH_REPS=3 benches/pull.sh   (a quick run)
#
# Environment (all optional):
#   BENCH_SIZE=4G          row a: virtual size of the fully allocated qcow2 disk
#   BENCH_WRITE_IOPS=2000  row a: the writer's fixed rate (writes issued per second)
#   BENCH_BS=4k            row a: the writer's request size
#   BENCH_QD=16            row a: at most this many writes in flight
#   BENCH_PULL_REPS=3      row a: pulls per daemon (each a fresh session); medians
#   BENCH_DISKS=10         row b: number of disks in the session
#   BENCH_DISK_SIZE=64M    row b: size of each disk (multiple of 1 MiB)
#   BENCH_REPS=10          row b: sessions begun (and ended) per daemon
#   BENCH_QSD_SCRATCH=blockdev-create  how the libvirt sequence makes each
#                          scratch: blockdev-create (QMP jobs, as libvirt) or
#                          qemu-img (`qemu-img create -b DISK -F qcow2`, a process each)
#   BENCH_TIDEMARK_SEQ=session  tidemark's begin: session (x-tidemark-backup-begin)
#                          or libvirt (the same QMP sequence as qsd)
#   BENCH_ROWS="pull begin"     which rows, in this order
#   BENCH_DAEMONS="qsd tidemark"  which daemons, in this order
#   BENCH_VERIFY=1         0: skip row a's check that the pulled view is the disk
#                          as it was at the begin (cksum before the begin and of a
#                          second pull after the writer stopped; untimed)
#   BENCH_NBDCOPY_OPTS     extra nbdcopy options, e.g. --connections=1
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (images, sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default target/release/tidemark)
#   TIDEMARK_BASE_BIN=path another tidemark build, run as daemon tidemark-base
#   BENCH_START_TIMEOUT=30 seconds a daemon gets to answer NBD
#   BENCH_OP_TIMEOUT=600   seconds any one pull, QMP exchange or row-b run may take
#   BENCH_BUILD_TIMEOUT=600 seconds any one image-building qemu-io may take
#   BENCH_KEEP=1           keep the temp dir (images, daemon logs, JSON)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

# shellcheck source=benches/lib.sh
. "$here/lib.sh"
daemon_knobs   # BENCH_SIZE, BENCH_QD, BENCH_BS, BENCH_DAEMONS, ... TIDEMARK_BIN

write_iops=${BENCH_WRITE_IOPS:-2000}
n_disks=${BENCH_DISKS:-10}
disk_size_str=${BENCH_DISK_SIZE:-64M}
reps=${BENCH_REPS:-10}
pull_reps=${BENCH_PULL_REPS:-3}
qsd_scratch=${BENCH_QSD_SCRATCH:-blockdev-create}
tidemark_seq=${BENCH_TIDEMARK_SEQ:-session}
groups=${BENCH_ROWS:-pull begin}
read -r -a nbdcopy_opts <<<"${BENCH_NBDCOPY_OPTS:-}"
cluster=65536           # every image's cluster size, and the bitmaps' granularity
dirty_every=$((1 << 20)) # row b: one cluster written (and dirty) in every MiB

disk_size=$(to_bytes "$disk_size_str") || die "bad BENCH_DISK_SIZE: $disk_size_str"
[[ $write_iops =~ ^[1-9][0-9]*$ ]] || die "BENCH_WRITE_IOPS must be a positive integer"
[[ $n_disks =~ ^[1-9][0-9]*$ && $reps =~ ^[1-9][0-9]*$ && $pull_reps =~ ^[1-9][0-9]*$ ]] ||
    die "BENCH_DISKS, BENCH_REPS and BENCH_PULL_REPS must be positive integers"
((disk_size >= 1 << 20 && disk_size % (1 << 20) == 0)) || die "BENCH_DISK_SIZE must be a multiple of 1 MiB"
[[ $qsd_scratch =~ ^(blockdev-create|qemu-img)$ ]] || die "BENCH_QSD_SCRATCH must be blockdev-create or qemu-img"
[[ $tidemark_seq =~ ^(session|libvirt)$ ]] || die "BENCH_TIDEMARK_SEQ must be session or libvirt"
for g in $groups; do [[ $g =~ ^(pull|begin)$ ]] || die "BENCH_ROWS: unknown row $g (pull, begin)"; done
for t in nbdcopy cksum; do command -v "$t" >/dev/null || die "$t not found"; done
"$py" -c 'import nbd' 2>/dev/null || die "$py cannot import nbd (apt-get install python3-libnbd)"
has() { [[ " $groups " == *" $1 "* ]]; }

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-pull-bench.XXXXXX") || die "mktemp failed"
writer_pid=
# shellcheck disable=SC2317 # the EXIT trap runs it
pull_cleanup() {
    if [[ -n $writer_pid ]]; then
        kill -TERM "$writer_pid" 2>/dev/null
        wait "$writer_pid" 2>/dev/null
    fi
    cleanup
}
trap pull_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# the disk, a scratch that could fill up, the small disks and their scratches
need=$((2 * size + 2 * n_disks * disk_size + (1 << 30)))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

src=$tmp/source.qcow2   # row a: BENCH_SIZE, every cluster written

# ---- tidemark build ------------------------------------------------------

declare -A note    # per-daemon reasons for n/a cells and anomalies
build_tidemark

# ---- images ----------------------------------------------------------------

has pull && make_source "$src"

# make_disks: row b's disks, afresh (each daemon adds and removes bitmaps):
# $tmp/disk-N.qcow2, a persistent checkpoint bitmap c0 (64 KiB granularity),
# then one cluster written in every MiB with qemu-io (which records it in c0).
make_disks() {
    local i f
    for ((i = 0; i < n_disks; i++)); do
        f=$tmp/disk-$i.qcow2
        rm -f "$f"
        qemu-img create -q -f qcow2 -o cluster_size=$cluster "$f" "$disk_size" || return 1
        qemu-img bitmap --add -g $cluster "$f" c0 || return 1
        awk -v size="$disk_size" -v every=$dirty_every -v c=$cluster -v i="$i" \
            'BEGIN { for (o = 0; o < size; o += every) printf "write -q -P %d %.0f %d\n", (i * 7 + o / every) % 255 + 1, o, c }' >"$tmp/disk.cmds"
        qemu_io "$tmp/disk.cmds" -t unsafe -f qcow2 "$f" || return 1
    done
    rm -f "$tmp/disk.cmds"
    sync
}

# ---- daemons ---------------------------------------------------------------

layout=single   # single: the source as node src (row a); disks: row b's disks d0...
server_cmd() { # server_cmd NAME SOCKET: sets cmd (and qmp, the monitor socket)
    local i opts=()
    if [[ $layout == single ]]; then
        daemon_cmd "$1" "$2" --blockdev "driver=file,node-name=srcf,filename=$(qemu_opt "$src")" \
            --blockdev "driver=qcow2,node-name=src,file=srcf"
        return
    fi
    for ((i = 0; i < n_disks; i++)); do
        opts+=(--blockdev "driver=file,node-name=d${i}f,filename=$(qemu_opt "$tmp/disk-$i.qcow2")"
            --blockdev "driver=qcow2,node-name=d$i,file=d${i}f")
    done
    daemon_cmd "$1" "$2" "${opts[@]}"
    # daemon_cmd exports node src as ''; here that is d0 (only for the start-up poll)
    for i in "${!cmd[@]}"; do
        [[ ${cmd[i]} == type=nbd,id=e0,node-name=src,* ]] && cmd[i]=${cmd[i]/node-name=src,/node-name=d0,}
    done
}
disks_line="--blockdev driver=file,node-name=dNf,filename=disk-N.qcow2 --blockdev driver=qcow2,node-name=dN,file=dNf (N = 0 ...), and the export of d0"

# Before each daemon start: write back what the previous one left dirty, and
# read the images once, so that every daemon starts with the same warm cache.
prepare_cache() {
    sync
    if [[ $layout == single ]]; then
        cat "$src" >/dev/null
    else
        cat "$tmp"/disk-*.qcow2 >/dev/null
    fi
    return 0
}

seq_of() { # seq_of DAEMON: the begin sequence pull.py runs for it
    if [[ $1 == qsd ]]; then echo libvirt; else echo "$tidemark_seq"; fi
}

# session SERVER CMD OUT ARGS...: pull.py CMD (begin, end, first-byte) on the
# daemon's monitor with the session options; fails with why set.
session() {
    local s=$1 c=$2 out=$3
    shift 3
    # shellcheck disable=SC2016 # expanded by the inner sh
    if run $((op_timeout + 30)) sh -c '"$@" >"$0"' "$out" "$py" "$here/pull.py" "$c" "$qmp" \
        --seq "$(seq_of "$s")" --create "$qsd_scratch" --sock "$sock" --scratch-dir "$tmp/scratch-$s" \
        --timeout "$op_timeout" "$@" && jq -e .ok "$out" >/dev/null 2>&1; then
        return 0
    fi
    why=$(jq -r '"\(.failed): \(.error.desc)"' "$out" 2>/dev/null) || why="pull.py $c failed"
    [[ -n $why ]] || why="pull.py $c failed"
    return 1
}

# stop_writer: SIGTERM to the writer; its JSON is in $tmp/$s-writer.json
stop_writer() {
    [[ -n $writer_pid ]] || return 0
    kill -TERM "$writer_pid" 2>/dev/null
    wait "$writer_pid"
    local rc=$?
    writer_pid=
    return $rc
}

declare -A res     # res[server,row]
declare -A extra   # extra[server,what]: figures for the lines under the table

# (a) the pull under a fixed write load: pull_once SERVER REP makes one
# session, pull and end (REP 1 also checks the view when BENCH_VERIFY=1);
# sets v (seconds), sb (scratch bytes) and the writer's JSON in $out-writer.json.
pull_once() {
    local s=$1 out=$tmp/$1-pull-$2 scratch fleece t0 deadline before after
    v='' why='' sb=''
    if [[ $verify == 1 && $2 == 1 ]]; then
        log "$s: cksum of the disk before the begin (untimed)"
        # shellcheck disable=SC2016 # expanded by the inner sh
        run "$op_timeout" sh -c 'nbdcopy "$0" - | cksum >"$1"' "$uri" "$out-before.cksum" ||
            { why="nbdcopy of the live export failed"; return 1; }
        before=$(cat "$out-before.cksum")
    fi
    sync
    session "$s" begin "$out-begin.json" --id pull --size "$size" --disk "src=$src" || return 1
    fleece=$(jq -r '.exports[0].uri' "$out-begin.json")
    scratch=$(jq -r '.exports[0].scratch' "$out-begin.json")
    log "$s: pull $2 of $pull_reps: session begun in $(jq -r .secs "$out-begin.json")s; writer at $write_iops IOPS, then nbdcopy of $fleece"
    "$py" "$here/pull.py" write "$uri" --rate "$write_iops" --bs "$bs" --qd "$qd" --cluster $cluster \
        --seed "$2" --ready "$out-writer.ready" >"$out-writer.json" 2>"$out-writer.err" &
    writer_pid=$!
    deadline=$((SECONDS + start_timeout))
    until [[ -e $out-writer.ready ]]; do
        if ! kill -0 "$writer_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            why="the writer did not start: $(tail -n 1 "$out-writer.err")"
            stop_writer
            session "$s" end "$out-end.json" --id pull --size "$size" --disk "src=$src"
            return 1
        fi
        sleep 0.01
    done
    t0=$EPOCHREALTIME
    if run "$op_timeout" nbdcopy "${nbdcopy_opts[@]}" "$fleece" null:; then
        v=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
        # the scratch's allocated bytes the moment the pull ended
        sb=$(($(stat -c '%b * %B' "$scratch")))
    else
        why="nbdcopy of the fleecing export failed"
    fi
    stop_writer || { v=''; why="the writer failed: $(tail -n 1 "$out-writer.err")"; }
    if [[ -n $v ]]; then
        # once the writer stopped: tidemark's own figure, and qemu-img's
        [[ $s == tidemark* ]] && qmp_run "$out-query.json" -c x-tidemark-query-backups &&
            extra[$s,query]="x-tidemark-query-backups scratch-bytes $(jq -r '.returns[0][0].disks[0]."scratch-bytes"' "$out-query.json") (st_blocks then $(($(stat -c '%b * %B' "$scratch"))))"
        extra[$s,info]=$(qemu-img info -U --output=json "$scratch" 2>/dev/null | jq -r '"qemu-img info: disk-size \(."actual-size")"')
        extra[$s,file]=$(stat -c '%s' "$scratch")
    fi
    if [[ -n $v && -n ${before:-} ]]; then
        log "$s: cksum of the fleecing export after the writer stopped (untimed)"
        # shellcheck disable=SC2016 # expanded by the inner sh
        if run "$op_timeout" sh -c 'nbdcopy "$0" - | cksum >"$1"' "$fleece" "$out-after.cksum"; then
            after=$(cat "$out-after.cksum")
            [[ $after == "$before" ]] || { v=''; why="the pulled view differs from the disk at the begin (cksum $after, was $before)"; }
        else
            v='' why="the verifying nbdcopy failed"
        fi
    fi
    session "$s" end "$out-end.json" --id pull --size "$size" --disk "src=$src" ||
        add_note "$s" "ending the pull session: $why"
    [[ -n $v ]]
}

# pull_row SERVER: BENCH_PULL_REPS pulls; each figure is the median over them
pull_row() {
    local s=$1 r w all=() lines=()
    mkdir -p "$tmp/scratch-$s"
    for ((r = 1; r <= pull_reps; r++)); do
        pull_once "$s" "$r" || return 1
        w=$tmp/$s-pull-$r-writer.json
        all+=("$v $sb $(jq -r '"\(.ops) \(.clusters)"' "$w")")
        lines+=("$(jq -r --arg v "$v" --arg sb "$sb" '"\($v) s, scratch \($sb) B, \(.ops) writes (\(.iops) IOPS, latest \(.max_lag * 1000 | round) ms behind schedule), \(.clusters) clusters"' "$w")")
    done
    extra[$s,pulls]=$(printf '%s; ' "${lines[@]}")
    v=$(median_of 1 "${all[@]}")
    res[$s,scratch_mib]=$(awk -v b="$(median_of 2 "${all[@]}")" 'BEGIN { printf "%.1f", b / 1048576 }')
    res[$s,pull_writes]=$(median_of 3 "${all[@]}")
    res[$s,pull_clusters]=$(median_of 4 "${all[@]}")
    res[$s,scratch_per]=$(for r in "${all[@]}"; do awk -v c=$cluster '{ printf "%.3f", $2 / ($4 * c) }' <<<"$r"; echo; done |
        sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
}

# median_of FIELD LINE...: the median of field FIELD of the LINEs
median_of() {
    local f=$1
    shift
    printf '%s\n' "$@" | awk -v f="$f" '{ print $f }' | sort -g |
        awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# (b) begin to first byte, BENCH_DISKS disks, incremental from c0 with a new checkpoint c1
begin_row() { # begin_row SERVER
    local s=$1 out=$tmp/$1-begin.json i disks=() want
    v='' why=''
    mkdir -p "$tmp/scratch-$s"
    for ((i = 0; i < n_disks; i++)); do disks+=(--disk "d$i=$tmp/disk-$i.qcow2"); done
    session "$s" first-byte "$out" --id bk --size "$disk_size" --incremental c0 --checkpoint c1 \
        --granularity $cluster --reps "$reps" "${disks[@]}" || return 1
    v=$(jq -r '.median * 1000 | . * 10 | round / 10' "$out")
    res[$s,begin_min]=$(jq -r '.min * 1000 | . * 10 | round / 10' "$out")
    res[$s,begin_reply]=$(jq -r '.begun_median * 1000 | . * 10 | round / 10' "$out")
    extra[$s,begin_all]=$(jq -r '[.secs[] | . * 10000 | round / 10] | map(tostring) | join(", ")' "$out")
    want=$((disk_size * cluster / dirty_every))
    if ! jq -e --argjson w "$want" --argjson n "$n_disks" '.dirty | length == $n and all(.[]; . == $w)' "$out" >/dev/null; then
        add_note "$s" "begin: dirty bytes per export $(jq -c .dirty "$out"), expected $want each"
    fi
    jq -e '.reply_dirty == null or .reply_dirty == .dirty' "$out" >/dev/null ||
        add_note "$s" "begin: the reply's dirty-bytes $(jq -c .reply_dirty "$out") differ from the exports' bitmaps $(jq -c .dirty "$out")"
    jq -r '.uri_mismatch // empty | map("reply \(.[0]) != \(.[1])") | join("; ")' "$out" | grep . >/dev/null &&
        add_note "$s" "begin: the reply's URIs differ from nbd+unix:///NAME?socket=S: $(jq -c .uri_mismatch "$out")"
    return 0
}

# ---- the runs ------------------------------------------------------------

t_runs=$EPOCHREALTIME
for s in $servers; do
    [[ $s == tidemark && -n $build_failed ]] && { log "tidemark: skipped (${note[tidemark]})"; continue; }
    if has pull; then
        layout=single
        if start_daemon "$s" pull "the $size_str source"; then
            sock=${uri#*socket=}
            extra[$s,mc]=$(nbdinfo --json "$uri" 2>/dev/null | jq -r '.exports[0].can_multi_conn')
            pull_row "$s"; record "$s" pull_secs
            [[ -n ${res[$s,pull_secs]:-} ]] && res[$s,pull_mibps]=$(awk -v b="$size" -v t="${res[$s,pull_secs]}" 'BEGIN { printf "%.0f", b / 1048576 / t }')
            stop_daemon "$s"
        fi
    fi
    if has begin; then
        layout=disks
        log "$s: $n_disks fresh $disk_size_str disks with checkpoint c0 (setup)"
        make_disks || die "could not build the disks"
        if start_daemon "$s" begin "$n_disks disks of $disk_size_str"; then
            sock=${uri#*socket=}
            log "$s: $reps sessions of $n_disks disks ($(seq_of "$s") sequence)"
            begin_row "$s"; record "$s" begin_median
            stop_daemon "$s"
        fi
    fi
done
t_runs=$(secs_since "$t_runs")
log "runs done in ${t_runs}s"

# ---- report --------------------------------------------------------------

commit=$(checkout_id)
hsize=$(numfmt --to=iec "$size") hdisk=$(numfmt --to=iec "$disk_size")
declare -A label=(
    [pull_secs]="pull of the $hsize fleecing export, nbdcopy → null:, during $write_iops random $bs_str writes/s to the live export (s, median of $pull_reps)"
    [pull_mibps]="… MiB/s"
    [pull_writes]="… writes made during the pull (the same rate: more writes = a longer pull)"
    [pull_clusters]="… distinct 64 KiB clusters they hit"
    [scratch_mib]="scratch file allocated when the pull ended (MiB, st_blocks)"
    [scratch_per]="… divided by (distinct clusters × 64 KiB): 1 = only the clusters copied before the writes"
    [begin_median]="$n_disks-disk incremental session, begin → first byte of every export (ms, median of $reps)"
    [begin_min]="… fastest of $reps (ms)"
    [begin_reply]="… of which the begin alone, until its last reply (ms, median)"
)
rows=()
has pull && rows+=(pull_secs pull_mibps pull_writes pull_clusters scratch_mib scratch_per)
has begin && rows+=(begin_median begin_min begin_reply)

cat <<EOF
## Pull-mode backup: tidemark vs qemu-storage-daemon

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC'), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)
- daemons run one at a time, in this order: $servers (rows $groups for each; runs took ${t_runs}s); before each start: sync, then the images read once
- same command line for both: \`$daemon_line\`; for the begin row the source options are \`$disks_line\`
  - tidemark ($commit): \`target/release/tidemark daemon ...\`, begin: $(if [[ $tidemark_seq == session ]]; then echo "one \`x-tidemark-backup-begin\`, end: \`x-tidemark-backup-end success=false\`"; else echo "the libvirt QMP sequence, as qsd"; fi)
  - $(ver qemu-storage-daemon --version): \`qemu-storage-daemon ...\`, begin: libvirt's QMP sequence (scratch by $qsd_scratch, blockdev-add backing=disk, one transaction, block-export-add), see benches/pull.py
- QMP and NBD clients: benches/pull.py (one QMP connection per step; libnbd)
EOF
if has pull; then
    cat <<EOF
- pull rows: median of $pull_reps pulls, each in a fresh session: the $hsize qcow2 (64 KiB clusters, every cluster written, built in ${t_build}s); a full session (no bitmap), scratch in the temp dir ($(df --output=fstype "$tmp" | tail -n 1)); then \`pull.py write\` at $write_iops IOPS (bs $bs_str, at most $qd in flight, offsets seeded by the pull's number: the same sequences for both) on the live export; once it is connected, \`nbdcopy ${BENCH_NBDCOPY_OPTS:-}FLEECE null:\` timed; the scratch's st_blocks read as it exits, then the writer stopped; $([[ $verify == 1 ]] && echo "the first pull's view checked: cksum of a second read of it after the writer stopped = cksum of the disk before the begin" || echo "the view not checked (BENCH_VERIFY=0)")
EOF
    for s in $servers; do
        [[ -n ${extra[$s,pulls]:-} ]] || continue
        echo "  - $s: multi-conn ${extra[$s,mc]:-?}; each pull: ${extra[$s,pulls]}the last scratch file: ${extra[$s,file]} bytes long, ${extra[$s,info]:-}${extra[$s,query]:+; ${extra[$s,query]}}"
    done
fi
if has begin; then
    cat <<EOF
- begin row: $n_disks fresh qcow2 disks of $hdisk per daemon, each with a persistent bitmap c0 (64 KiB) and one cluster written in every MiB ($((disk_size / dirty_every)) dirty clusters); each rep, on one QMP connection: the begin (incremental c0, new checkpoint c1) then, per export, a libnbd connection with qemu:dirty-bitmap:backup-dN and a 512-byte read at 0, timed from sending the first command; then (untimed) each export's dirty bytes by block status, and the session ended (the new checkpoint removed)
EOF
    for s in $servers; do
        [[ -n ${extra[$s,begin_all]:-} ]] && echo "  - $s: every rep (ms): ${extra[$s,begin_all]}"
    done
fi
echo
qsd_table "${rows[@]}"
echo
echo "Ratios are tidemark / qsd: below 1x is better for seconds, ms and MiB, above 1x for MiB/s."
echo
daemon_notes
exit 0
