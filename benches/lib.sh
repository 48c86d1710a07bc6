# shellcheck shell=bash
# Helpers shared by benches/compare.sh (raw file) and benches/qcow2.sh (qcow2
# chain).  Source it; it only defines functions.  They read the caller's
# globals when called:
#
#   tmp            the run's temp dir (sockets, logs, JSON, images)
#   note           associative array: per-server reason for an n/a cell
#   res            associative array: res[SERVER,ROW] = number
#   srv_pid, uri   set by start_server, cleared by stop_server
#   start_timeout  seconds a server gets to answer an NBD handshake
#   randio rand_secs qd bs py here   random-I/O settings (rand_io)
#   tidemark_bin   (start_server checks it exists)
#
# and the caller defines server_cmd NAME SOCKET, which sets the cmd array.

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
# srv_pid and uri.  Returns 1 (with note[NAME]) on failure.
start_server() {
    local name=$1 sock=$tmp/$1${2:+-$2}.sock srvlog=$tmp/$1${2:+-$2}.log deadline
    uri="nbd+unix:///?socket=$sock"
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

rand_io() { # rand_io read|write
    local out=$tmp/rand-$1.json
    if [[ $randio == fio ]]; then
        run $((rand_secs + 60)) fio --name="rand$1" --ioengine=nbd --uri="$uri" \
            --rw="rand$1" --bs="$bs" --iodepth="$qd" --numjobs=1 \
            --time_based --runtime="$rand_secs" \
            --output-format=json --output="$out" || return 1
        v=$(jq -e --arg op "$1" '.jobs[0] | select(.error == 0) | .[$op].iops | floor' "$out")
    else
        run $((rand_secs + 60)) sh -c '"$@" >"$0"' "$out" "$py" "$here/randio.py" "$uri" "$1" \
            --secs "$rand_secs" --qd "$qd" --bs "$bs" || return 1
        v=$(jq -e '.iops | floor' "$out")
    fi
}

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
cell() { echo "${res[$1,$2]:-n/a}"; }
ratio() { # ratio SERVER ROW -> SERVER / qemu-nbd
    local a=${res[$1,$2]:-} b=${res[qemu-nbd,$2]:-}
    [[ -n $a && -n $b ]] || { echo n/a; return; }
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'
}
