# shellcheck shell=bash
# Helpers shared by benches/compare.sh (raw file), benches/qcow2.sh (qcow2
# chain), and benches/backup.sh and benches/live.sh (QMP daemons, which also
# share their common knobs through daemon_knobs).  Source it; it only defines
# functions and initialises the globals they own.  They read the caller's
# globals when called:
#
#   tmp            the run's temp dir (sockets, logs, JSON, images)
#   note           associative array: per-server reason for an n/a cell
#   res            associative array: res[SERVER,ROW] = number
#   label          associative array: a report row's text (base_table, qsd_table)
#   srv_pid, uri   set by start_server, cleared by stop_server
#   start_timeout  seconds a server gets to answer an NBD handshake
#   randio rand_secs qd bs py here   random-I/O settings (rand_io)
#   tidemark_bin   (start_server checks it exists)
#   servers repo   which servers run, the checkout (build_tidemark, checkout_id)
#   build_timeout  seconds any one qemu-io may take (qemu_io)
#   size size_str cluster   the source image (make_source, job_speed)
#   op_timeout verify   QMP and compare settings (qmp_run, same_image)
#   v why          a row's value, or why it has none (record)
#
# and the caller defines server_cmd NAME SOCKET, which sets the cmd array
# (backup.sh and live.sh through daemon_cmd), and prepare_cache (start_daemon).

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

to_bytes() { numfmt --from=iec "${1^^}" 2>/dev/null; }

# select_randio: resolves randio=auto to fio or python and checks the choice.
select_randio() {
    if [[ $randio == auto ]]; then
        if command -v fio >/dev/null && fio --enghelp=nbd 2>/dev/null | grep -q uri; then
            randio=fio
        else
            randio=python
        fi
    fi
    case $randio in
    fio) fio --enghelp=nbd 2>/dev/null | grep -q uri || die "fio has no nbd engine; use BENCH_RANDIO=python" ;;
    python) "$py" -c 'import nbd' 2>/dev/null || die "$py cannot import nbd (apt-get install python3-libnbd)" ;;
    *) die "BENCH_RANDIO must be fio, python or auto" ;;
    esac
}

# ---- cleanup (install with: trap cleanup EXIT) ------------------------------

srv_pid=
load_pid=
cleanup() {
    if [[ -n ${load_pid:-} ]]; then
        kill -TERM "$load_pid" 2>/dev/null
        wait "$load_pid" 2>/dev/null
    fi
    if [[ -n ${sampler_pid:-} ]]; then
        kill -TERM "$sampler_pid" 2>/dev/null
        wait "$sampler_pid" 2>/dev/null
    fi
    if [[ -n $srv_pid ]] && kill -0 "$srv_pid" 2>/dev/null; then
        kill -TERM "$srv_pid" 2>/dev/null
        wait "$srv_pid" 2>/dev/null
    fi
    if [[ -n ${BENCH_KEEP:-} ]]; then
        log "kept $tmp"
    else
        rm -rf "$tmp"
    fi
}

# ---- tidemark build -------------------------------------------------------

# build_tidemark: `cargo build --release` when tidemark is one of $servers
# (unless BENCH_NO_BUILD); on failure note[tidemark] says so and build_failed
# is set.
# shellcheck disable=SC2034 # read by the caller
build_failed=
build_tidemark() {
    if [[ " $servers " == *" tidemark "* && -z ${BENCH_NO_BUILD:-} ]]; then
        log "cargo build --release (log: $tmp/cargo.log)"
        if ! (cd "$repo" && cargo build --release) >"$tmp/cargo.log" 2>&1; then
            note[tidemark]="cargo build --release failed"
            build_failed=1
            tail -n 15 "$tmp/cargo.log" >&2
        fi
    fi
}

secs_since() { # secs_since T0: whole seconds since $EPOCHREALTIME was T0
    awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }'
}

# ---- test data ------------------------------------------------------------
# Fully allocated, incompressible, no zero runs: otherwise nbdcopy would skip
# holes (base:allocation) or zero blocks and measure nothing.  A 64 MiB random
# chunk repeated is enough for that and much faster than /dev/urandom for GiBs.

fill() { # fill FILE BYTES
    local chunk=$tmp/chunk
    [[ -f $chunk ]] || head -c $((64 << 20)) /dev/urandom >"$chunk"
    while cat "$chunk"; do :; done 2>/dev/null | head -c "$2" >"$1"
    [[ $(stat -c %s "$1") == "$2" ]] || die "could not create $1"
}

mibps() { awk -v b="$1" -v t0="$2" -v t1="$3" 'BEGIN { printf "%.0f", b / 1048576 / (t1 - t0) }'; }

# ---- servers --------------------------------------------------------------

# start_server NAME [TAG]: starts it on a fresh socket ($tmp/NAME[-TAG].sock,
# log $tmp/NAME[-TAG].log), waits until it answers an NBD handshake.  Sets
# srv_pid and uri (nbd+unix:///?socket=SOCKET, or what the caller's
# server_uri SOCKET prints, if it defines one).  Returns 1 (with note[NAME])
# on failure.
start_server() {
    local name=$1 sock=$tmp/$1${2:+-$2}.sock srvlog=$tmp/$1${2:+-$2}.log deadline
    uri="nbd+unix:///?socket=$sock"
    # a caller that serves otherwise (TLS, TCP) defines server_uri SOCKET
    if declare -F server_uri >/dev/null; then uri=$(server_uri "$sock"); fi
    server_cmd "$name" "$sock"
    if [[ $name == tidemark* && ! -x $(tidemark_of "$name") ]]; then
        note[$name]="${note[$name]:-no binary at $(tidemark_of "$name")}"
        return 1
    fi
    if ! command -v "${cmd[0]}" >/dev/null; then
        note[$name]="${cmd[0]} not installed"
        return 1
    fi
    "${cmd[@]}" >"$srvlog" 2>&1 &
    srv_pid=$!
    deadline=$((SECONDS + start_timeout))
    until nbdinfo --size "$uri" >/dev/null 2>&1; do
        if ! kill -0 "$srv_pid" 2>/dev/null; then
            wait "$srv_pid" 2>/dev/null
            note[$name]="server exited during start-up"
            tail -n 10 "$srvlog" >&2
            srv_pid=
            return 1
        fi
        if ((SECONDS >= deadline)); then
            note[$name]="no NBD handshake within ${start_timeout}s"
            stop_server
            return 1
        fi
        sleep 0.05
    done
}

stop_server() {
    [[ -n $srv_pid ]] || return 0
    kill -TERM "$srv_pid" 2>/dev/null
    local deadline=$((SECONDS + 15))
    while kill -0 "$srv_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.05; done
    kill -KILL "$srv_pid" 2>/dev/null
    wait "$srv_pid" 2>/dev/null
    srv_pid=
}

# Loads run in the background and the script waits for them, so that a signal
# to the script is handled at once (bash defers traps while a foreground child
# runs); cleanup() then stops the load and the server.
run() { # run SECONDS CMD...: CMD under timeout(1), output to stderr
    local t=$1 rc
    shift
    timeout -k 5 "$t" "$@" >&2 &
    load_pid=$!
    wait "$load_pid"
    rc=$?
    load_pid=
    return $rc
}

# ---- loads: each sets v to one number, or fails ---------------------------

# rand_io read|write [SPAN].  Offsets over the whole export, or with SPAN
# (bytes) over its first SPAN bytes only.  fio runs with
# LD_PRELOAD=$fio_preload when the caller sets it (tls.sh: nbd_allow_local.c,
# so fio's engine takes tls-certificates=).
fio_preload=
rand_io() { # rand_io read|write [SPAN]
    local out=$tmp/rand-$1${2:+-$2}.json pre=() span=()
    [[ -n $fio_preload ]] && pre=(env "LD_PRELOAD=$fio_preload")
    if [[ $randio == fio ]]; then
        [[ -n ${2:-} ]] && span=(--size="$2")
        run $((rand_secs + 60)) "${pre[@]}" fio --name="rand$1" --ioengine=nbd --uri="$uri" \
            --rw="rand$1" --bs="$bs" --iodepth="$qd" --numjobs=1 "${span[@]}" \
            --time_based --runtime="$rand_secs" \
            --output-format=json --output="$out" || return 1
        v=$(jq -e --arg op "$1" '.jobs[0] | select(.error == 0) | .[$op].iops | floor' "$out")
    else
        [[ -n ${2:-} ]] && span=(--span "$2")
        run $((rand_secs + 60)) sh -c '"$@" >"$0"' "$out" "$py" "$here/randio.py" "$uri" "$1" \
            --secs "$rand_secs" --qd "$qd" --bs "$bs" "${span[@]}" || return 1
        v=$(jq -e '.iops | floor' "$out")
    fi
}

# timed_pull NBDCOPY-OPTION...: `nbdcopy OPTIONS $uri null:`, BENCH_PULL_REPS
# times in a row (default 3: one pull on this shared 2-core machine varies by
# ±30%); sets secs (wall, 3 decimals) and cpu (the server's utime + stime
# during it, all threads, seconds, 2 decimals; clk_tck: the caller's
# $(getconf CLK_TCK), else 100), each the median over the pulls.
timed_pull() {
    local c0 c1 t0 t1 i all_secs=() all_cpu=()
    for ((i = 0; i < ${BENCH_PULL_REPS:-3}; i++)); do
        c0=$(cpu_ticks) || return 1
        t0=$EPOCHREALTIME
        run "$op_timeout" nbdcopy "$@" "$uri" null: || return 1
        t1=$EPOCHREALTIME
        c1=$(cpu_ticks) || return 1
        all_secs+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')")
        all_cpu+=("$(awk -v a="$c0" -v b="$c1" -v hz="${clk_tck:-100}" 'BEGIN { printf "%.2f", (b - a) / hz }')")
    done
    secs=$(awk -v m="$(median "${all_secs[@]}")" 'BEGIN { printf "%.3f", m }')
    cpu=$(awk -v m="$(median "${all_cpu[@]}")" 'BEGIN { printf "%.2f", m }')
}

# A background sampler of the server's thread count (started and stopped
# around one load; cleanup() stops a sampler left running).
sampler_pid=
sample_threads_start() { # sample_threads_start OUT: every 50 ms, Threads of $srv_pid to OUT
    local pid=$srv_pid
    (
        while [[ -r /proc/$pid/status ]]; do
            while read -r k n _; do
                [[ $k == Threads: ]] && { echo "$n"; break; }
            done <"/proc/$pid/status"
            sleep 0.05
        done
    ) >"$1" 2>/dev/null &
    sampler_pid=$!
}
sample_threads_stop() { # sample_threads_stop OUT: stops the sampler; prints the largest count
    [[ -n $sampler_pid ]] && { kill "$sampler_pid" 2>/dev/null; wait "$sampler_pid" 2>/dev/null; }
    sampler_pid=
    awk '$1 > m { m = $1 } END { if (m) print m; else exit 1 }' "$1"
}

# scatter_cmds N EVERY BLOCK: qemu-io commands writing N blocks of BLOCK bytes
# (pattern 0x5a), one at a random place in each group of EVERY blocks (the
# same places in every run: srand(1)), a flush every 64 writes.
scatter_cmds() {
    awk -v n="$1" -v every="$2" -v c="$3" 'BEGIN {
        srand(1)
        for (i = 0; i < n; i++) {
            printf "aio_write -P 0x5a %.0f %d\n", (i * every + int(rand() * every)) * c, c
            if ((i + 1) % 64 == 0) print "aio_flush"
        }
        print "aio_flush"
    }'
}

# cpu_ticks: utime + stime of the whole server process (all threads), in ticks
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$srv_pid/stat"; }

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

peak_rss_mib() {
    awk '/^VmHWM:/ { printf "%.1f", $2 / 1024; found = 1 } END { exit !found }' "/proc/$srv_pid/status"
}

# tidemark_of NAME: the binary of server `tidemark`, or of `tidemark-base`:
# another build of tidemark (TIDEMARK_BASE_BIN, e.g. the commit before a
# change) run in the same pass, for before/after figures.
tidemark_of() {
    if [[ $1 == tidemark-base ]]; then echo "${TIDEMARK_BASE_BIN:-}"; else echo "$tidemark_bin"; fi
}

# ---- report ---------------------------------------------------------------

# base_table ROW...: tidemark against tidemark-base, when both ran.
base_table() {
    local row a b r
    [[ " $servers " == *" tidemark-base "* ]] || return 0
    echo
    echo "tidemark against tidemark-base (\`${TIDEMARK_BASE_BIN:-}\`), same run:"
    echo
    echo "| load | tidemark-base | tidemark | tidemark / tidemark-base |"
    echo "|---|---:|---:|---:|"
    for row; do
        a=${res[tidemark,$row]:-} b=${res[tidemark-base,$row]:-} r=n/a
        [[ -n $a && -n $b ]] && r=$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.3fx", a / b; else print "n/a" }')
        printf '| %s | %s | %s | %s |\n' "${label[$row]}" "$(cell tidemark-base "$row")" "$(cell tidemark "$row")" "$r"
    done
}

ver() { "$@" 2>/dev/null | head -n 1; }

# checkout_id: the checkout's commit, +dirty if src or the manifests changed
checkout_id() {
    local id
    id=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
    [[ -n $(git -C "$repo" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && id+="+dirty"
    echo "$id"
}

cell() { echo "${res[$1,$2]:-n/a}"; }
# ratio_or_own SERVER ROW: ratio SERVER ROW; but for a row in the caller's
# associative array own (a figure that is a ratio itself, e.g. a server's
# speed-up from 1 to 2 connections) the server's own figure, "N.NNx (own)"
ratio_or_own() {
    if [[ -n ${own[$2]:-} ]]; then
        if [[ -n ${res[$1,$2]:-} ]]; then echo "${res[$1,$2]}x (own)"; else echo n/a; fi
    else
        ratio "$1" "$2"
    fi
}
ratio() { # ratio SERVER ROW [REF] -> SERVER / REF (default qemu-nbd)
    local a=${res[$1,$2]:-} b=${res[${3:-qemu-nbd},$2]:-}
    [[ -n $a && -n $b ]] || { echo n/a; return; }
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'
}

# ---- knobs of backup.sh and live.sh ----------------------------------------

# daemon_knobs: sets and checks the knobs both QMP-daemon benches take (their
# headers list them): size_str and size, rand_secs, qd, bs_str and bs,
# randio, servers, verify, start_timeout, op_timeout, build_timeout,
# tidemark_bin, py; and checks that the tools they run are there.
daemon_knobs() {
    local t
    size_str=${BENCH_SIZE:-4G}
    rand_secs=${BENCH_RAND_SECS:-10}
    qd=${BENCH_QD:-16}
    bs_str=${BENCH_BS:-4k}
    randio=${BENCH_RANDIO:-auto}
    servers=${BENCH_DAEMONS:-qsd tidemark}
    verify=${BENCH_VERIFY:-1}
    start_timeout=${BENCH_START_TIMEOUT:-30}
    op_timeout=${BENCH_OP_TIMEOUT:-600}
    build_timeout=${BENCH_BUILD_TIMEOUT:-600}
    tidemark_bin=${TIDEMARK_BIN:-$repo/target/release/tidemark}
    py=/usr/bin/python3   # Debian's python has python3-libnbd; a pyenv python3 does not

    size=$(to_bytes "$size_str") || die "bad BENCH_SIZE: $size_str"
    bs=$(to_bytes "$bs_str") || die "bad BENCH_BS: $bs_str"
    [[ $rand_secs =~ ^[1-9][0-9]*$ && $qd =~ ^[1-9][0-9]*$ ]] || die "BENCH_RAND_SECS and BENCH_QD must be positive integers"
    [[ "$start_timeout $op_timeout $build_timeout" =~ ^[1-9][0-9]*\ [1-9][0-9]*\ [1-9][0-9]*$ ]] ||
        die "BENCH_START_TIMEOUT, BENCH_OP_TIMEOUT and BENCH_BUILD_TIMEOUT must be positive integers"
    [[ $verify == [01] ]] || die "BENCH_VERIFY must be 0 or 1"
    ((size >= 1 << 20 && size % (1 << 20) == 0)) || die "BENCH_SIZE must be a multiple of 1 MiB"
    ((size >= bs)) || die "BENCH_SIZE smaller than BENCH_BS"
    for t in qemu-img qemu-io nbdinfo numfmt timeout jq; do
        command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install qemu-utils libnbd-bin coreutils jq)"
    done
    [[ -x $py ]] || die "$py not found"
}

# job_speed KNOB VALUE: a job's speed limit in bytes/s from VALUE (suffixes
# ok), or for `auto` BENCH_SIZE / (64 * BENCH_RAND_SECS) in whole clusters,
# at least one.  KNOB names it in errors.  Run it as $(job_speed ...) || exit.
job_speed() {
    local v
    if [[ $2 == auto ]]; then
        v=$((size / (64 * rand_secs) / cluster * cluster))
        ((v >= cluster)) || v=$cluster
    else
        v=$(to_bytes "$2") || die "bad $1: $2"
        ((v > 0)) || die "$1 must be positive"
    fi
    echo "$v"
}

# ---- qcow2 images ----------------------------------------------------------

qemu_io() { # qemu_io CMDS ARGS...: qemu-io ARGS with the commands in file CMDS
    local cmds=$1 out=$tmp/qemu-io.out
    shift
    # shellcheck disable=SC2016 # expanded by the inner sh
    run "$build_timeout" sh -c 'o=$1; shift; qemu-io "$@" <"$0" >"$o" 2>&1' "$cmds" "$out" "$@" ||
        { tail -n 5 "$out" >&2; return 1; }
    # qemu-io's exit status does not reflect failed commands: look for errors
    if grep -qiE 'error|failed|invalid' "$out"; then
        grep -iE -m 5 'error|failed|invalid' "$out" >&2
        return 1
    fi
}

allocated() { qemu-img check -U --output=json "$1" 2>/dev/null | jq -e '."allocated-clusters"'; }

# make_source IMG: a $size qcow2 with every $cluster-byte cluster written: a
# 64 MiB random chunk written over and over (qemu-io `write -s`,
# cache=unsafe, one sync at the end, untimed), so no daemon can skip or
# zero-detect anything.  Dies on failure; sets t_build (seconds taken).
make_source() {
    local got
    t_build=$EPOCHREALTIME
    log "creating the $size_str qcow2 source, every cluster written"
    qemu-img create -q -f qcow2 -o cluster_size="$cluster" "$1" "$size" || die "qemu-img create failed"
    head -c $((64 << 20)) /dev/urandom >"$tmp/chunk"
    awk -v size="$size" 'BEGIN {
        for (o = 0; o < size; o += 64 * 1048576)
            printf "write -q -s CHUNK %.0f %.0f\n", o, (size - o < 64 * 1048576 ? size - o : 64 * 1048576)
    }' | sed "s|CHUNK|$tmp/chunk|" >"$tmp/cmds"
    qemu_io "$tmp/cmds" -t unsafe -f qcow2 "$1" || die "qemu-io on $1 failed"
    rm -f "$tmp/chunk" "$tmp/cmds"
    got=$(allocated "$1") || die "qemu-img check $1 failed"
    ((got == size / cluster)) || die "$1 has $got clusters allocated, expected $((size / cluster))"
    sync
    t_build=$(secs_since "$t_build")
    log "source ready in ${t_build}s"
}

# ---- QMP daemons: qemu-storage-daemon (qsd) and `tidemark daemon` ---------

qemu_opt() { printf '%s' "${1//,/,,}"; }   # a path inside a qemu option value

# daemon_cmd NAME SOCKET BLOCKDEV-OPTION...: sets cmd to daemon NAME (qsd,
# tidemark or tidemark-base) with the options between the monitor and the
# NBD server: the same command line for every daemon but the binary.  Sets
# qmp, the monitor socket.  The node to export is `src`.
daemon_cmd() {
    local base=${2%.sock}
    case $1 in
    qsd) cmd=(qemu-storage-daemon) ;;
    tidemark | tidemark-base) cmd=("$(tidemark_of "$1")" daemon) ;;
    *) die "unknown daemon $1" ;;
    esac
    qmp=$base.qmp
    rm -f "$qmp" "$base.pid"
    cmd+=(--chardev "socket,id=qmp0,path=$(qemu_opt "$qmp"),server=on,wait=off" --monitor chardev=qmp0
        "${@:3}"
        --nbd-server "addr.type=unix,addr.path=$(qemu_opt "$2")"
        --export "type=nbd,id=e0,node-name=src,name=,writable=on"
        --pidfile "$base.pid")
}
qmp=
# daemon_cmd's line for the report, with a plain qcow2 source
# shellcheck disable=SC2034 # read by the caller
daemon_line="--chardev socket,id=qmp0,path=QMP,server=on,wait=off --monitor chardev=qmp0 --blockdev driver=file,node-name=srcf,filename=IMG --blockdev driver=qcow2,node-name=src,file=srcf --nbd-server addr.type=unix,addr.path=SOCK --export type=nbd,id=e0,node-name=src,name=,writable=on --pidfile PID"

# start_daemon SERVER TAG WHAT: the caller's prepare_cache, then start_server
# (sockets tagged TAG); logs what it serves (WHAT) and, on failure, why.
start_daemon() {
    log "$1: preparing page cache"
    prepare_cache
    log "$1: starting on $3"
    start_server "$1" "$2" || { log "$1: ${note[$1]}"; return 1; }
}

# stop_daemon SERVER: SIGTERM (stop_server: SIGKILL after 15 s); notes a slow exit
stop_daemon() {
    local t0=$SECONDS
    stop_server
    ((SECONDS - t0 < 14)) || add_note "$1" "did not exit within 15 s of SIGTERM (killed)"
}

# qmp_run OUT STEP...: benches/qmp_job.py on the daemon's monitor, its JSON in
# OUT; fails (with qerr set to the QMP error text) unless it succeeded.
qerr=
qmp_run() {
    local out=$1
    shift
    qerr=
    # shellcheck disable=SC2016 # expanded by the inner sh
    if run $((op_timeout + 30)) sh -c '"$@" >"$0"' "$out" "$py" "$here/qmp_job.py" "$qmp" \
        --timeout "$op_timeout" "$@" && jq -e .ok "$out" >/dev/null 2>&1; then
        return 0
    fi
    qerr=$(jq -r '"\(.failed): \(.error.desc)"' "$out" 2>/dev/null) || qerr="qmp_job.py failed"
    [[ -n $qerr ]] || qerr="qmp_job.py failed"
    return 1
}

# The blockdev-add arguments of a target node (NAME) of KIND, a file for qcow2.
target_args() { # target_args KIND NAME SIZE [FILE]
    if [[ $1 == null-co ]]; then
        jq -cn --arg n "$2" --argjson s "$3" '{driver: "null-co", "node-name": $n, size: $s, "read-zeroes": false}'
    else
        jq -cn --arg n "$2" --arg f "$4" '{driver: "qcow2", "node-name": $n, file: {driver: "file", filename: $f}}'
    fi
}

# Compares two images (untimed; -U: the daemon still holds them).
same_image() { # same_image A B
    [[ $verify == 1 ]] || return 0
    run "$op_timeout" qemu-img compare -U -q -f qcow2 -F qcow2 "$1" "$2"
}

# ---- rows and report -------------------------------------------------------

add_note() { note[$1]="${note[$1]:+${note[$1]}; }$2"; }

# record SERVER ROW: stores $v, or notes the failure with $why
record() {
    if [[ -n ${v:-} ]]; then
        res[$1,$2]=$v
        log "$1: $2 = $v"
    else
        log "$1: $2 failed${why:+: $why}"
        add_note "$1" "$2: ${why:-failed}"
        [[ -n $srv_pid ]] && ! kill -0 "$srv_pid" 2>/dev/null && note[$1]+=" (daemon died)"
    fi
}

# ratio_row SERVER ROW A B: res[SERVER,ROW] = res[SERVER,A] / res[SERVER,B],
# when both are there
ratio_row() {
    local a=${res[$1,$3]:-} b=${res[$1,$4]:-}
    [[ -n $a && -n $b ]] || return 0
    res[$1,$2]=$(awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.3f", a / b }')
}

# qsd_table ROW...: the report's table of qsd against tidemark (rows labelled
# by label[ROW]), and tidemark against tidemark-base when both ran.
qsd_table() {
    local row
    echo "| row | qsd | tidemark | tidemark / qsd |"
    echo "|---|---:|---:|---:|"
    for row; do
        printf '| %s | %s | %s | %s |\n' "${label[$row]}" "$(cell qsd "$row")" "$(cell tidemark "$row")" "$(ratio tidemark "$row" qsd)"
    done
    base_table "$@"
}

# daemon_notes: the report's lines on each daemon's notes, and on the
# daemons BENCH_DAEMONS left out.
daemon_notes() {
    local s
    for s in $servers; do
        [[ -n ${note[$s]:-} ]] && echo "- $s: ${note[$s]}"
    done
    for s in qsd tidemark; do
        [[ " $servers " != *" $s "* ]] && echo "- $s: not run (BENCH_DAEMONS)"
    done
    return 0
}
