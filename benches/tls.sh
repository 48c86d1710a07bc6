#!/usr/bin/env bash
# tidemark vs qemu-nbd over TLS: a sequential pull of the whole export
# (nbdcopy → null:) and 4k random reads at QD 16, with the same certificates
# for both servers, in one run; the same two rows without TLS for context.
# Rounds alternate the servers; each cell is the median over the rounds.
# Progress goes to stderr, a markdown report to stdout.  See
# benches/README.md.
#
# Usage: benches/tls.sh                (from anywhere; builds tidemark first)
#
# Environment (all optional):
#   BENCH_SIZE=4G          size of the served image (sequential read size)
#   BENCH_ROUNDS=3         rounds; the server order is reversed every other round
#   BENCH_MODES="x509 plain"   which rows: x509 (tls-creds-x509), psk
#                          (tls-creds-psk, user alice), plain (no TLS)
#   BENCH_FORMATS=raw      raw and/or qcow2 (converted from the raw image)
#   BENCH_TRANSPORT=unix   unix (a socket in the temp dir) or tcp (127.0.0.1)
#   BENCH_WARMUP=1         one untimed nbdcopy pull after each start (0: none)
#   BENCH_RAND_SECS=10     seconds per random-read run
#   BENCH_QD=16            random-read queue depth (requests in flight)
#   BENCH_BS=4k            random-read request size
#   BENCH_RANDIO=auto      fio | python | auto (fio if its nbd engine exists
#                          and cc can build nbd_allow_local.c)
#   BENCH_SERVERS="tidemark qemu-nbd"   which servers, order of odd rounds
#   BENCH_DIR=${TMPDIR:-/var/tmp}  where the temp dir (image, certificates,
#                          sockets, logs) goes
#   BENCH_NO_BUILD=1       don't run `cargo build --release`
#   TIDEMARK_BIN=path      tidemark binary (default
#                          ${CARGO_TARGET_DIR:-target}/release/tidemark)
#   BENCH_NBDCOPY_OPTS=""  extra nbdcopy options, e.g. --connections=1
#   BENCH_START_TIMEOUT=30 seconds a server gets to answer an NBD handshake
#   BENCH_OP_TIMEOUT=180   seconds any one nbdcopy may take before it counts as failed
#   BENCH_KEEP=1           keep the temp dir (server logs, fio JSON)

set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

size_str=${BENCH_SIZE:-4G}
rounds=${BENCH_ROUNDS:-3}
modes=${BENCH_MODES:-x509 plain}
formats=${BENCH_FORMATS:-raw}
transport=${BENCH_TRANSPORT:-unix}
warmup=${BENCH_WARMUP:-1}
rand_secs=${BENCH_RAND_SECS:-10}
qd=${BENCH_QD:-16}
bs_str=${BENCH_BS:-4k}
randio=${BENCH_RANDIO:-auto}
servers=${BENCH_SERVERS:-tidemark qemu-nbd}
servers_asked=$servers
start_timeout=${BENCH_START_TIMEOUT:-30}
op_timeout=${BENCH_OP_TIMEOUT:-180}
nbdcopy_opts=${BENCH_NBDCOPY_OPTS:-}
tidemark_bin=${TIDEMARK_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/tidemark}
py=/usr/bin/python3   # Debian's python has python3-libnbd; a pyenv python3 does not

# shellcheck source=benches/lib.sh
. "$here/lib.sh"

size=$(to_bytes "$size_str") || die "bad BENCH_SIZE: $size_str"
bs=$(to_bytes "$bs_str") || die "bad BENCH_BS: $bs_str"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"
[[ $rand_secs =~ ^[1-9][0-9]*$ && $qd =~ ^[1-9][0-9]*$ ]] || die "BENCH_RAND_SECS and BENCH_QD must be positive integers"
((size >= 1 << 20 && size % (1 << 20) == 0)) || die "BENCH_SIZE must be a multiple of 1 MiB"
((size >= bs)) || die "BENCH_SIZE smaller than BENCH_BS"
[[ $transport == unix || $transport == tcp ]] || die "BENCH_TRANSPORT must be unix or tcp"
[[ $warmup == [01] ]] || die "BENCH_WARMUP must be 0 or 1"
for m in $modes; do [[ $m == x509 || $m == psk || $m == plain ]] || die "BENCH_MODES: unknown mode $m (x509, psk, plain)"; done
for f in $formats; do [[ $f == raw || $f == qcow2 ]] || die "BENCH_FORMATS: unknown format $f (raw, qcow2)"; done
for s in $servers; do [[ $s == tidemark || $s == qemu-nbd ]] || die "BENCH_SERVERS: unknown server $s (tidemark, qemu-nbd)"; done
[[ -n $modes && -n $formats && -n $servers ]] || die "BENCH_MODES, BENCH_FORMATS and BENCH_SERVERS must not be empty"
for t in nbdcopy nbdinfo qemu-nbd openssl numfmt timeout jq; do
    command -v "$t" >/dev/null || die "$t not found (Debian: apt-get install libnbd-bin qemu-utils openssl coreutils jq)"
done
[[ " $formats " == *" qcow2 "* ]] && { command -v qemu-img >/dev/null || die "qemu-img not found"; }
[[ -f $repo/tests/tls/gen-certs.sh ]] || die "no tests/tls/gen-certs.sh in $repo"
tls_modes=$(for m in $modes; do [[ $m != plain ]] && printf '%s ' "$m"; done)
clk_tck=$(getconf CLK_TCK) || die "getconf CLK_TCK failed"

randio_asked=$randio
select_randio

# ---- temp dir and cleanup -------------------------------------------------

tmp=$(mktemp -d "${BENCH_DIR:-${TMPDIR:-/var/tmp}}/tidemark-tls.XXXXXX") || die "mktemp failed"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need=$(( size * $(wc -w <<<"$formats") + (256 << 20) ))
avail=$(($(df --output=avail -B1 "$tmp" | tail -n 1)))
((avail > need)) || die "$tmp has $(numfmt --to=iec "$avail") free, the run needs about $(numfmt --to=iec "$need")"

# fio's nbd engine does not let libnbd read tls-certificates= / tls-psk-file=
# (see nbd_allow_local.c): preload the shim that does, or use randio.py.
if [[ $randio == fio && -n $tls_modes ]]; then
    if command -v cc >/dev/null &&
        cc -O2 -shared -fPIC -o "$tmp/nbd_allow_local.so" "$here/nbd_allow_local.c" -ldl 2>"$tmp/cc.log"; then
        fio_preload=$tmp/nbd_allow_local.so
    elif [[ $randio_asked == auto ]]; then
        log "cannot build nbd_allow_local.c (cc), so fio cannot read the certificates: using randio.py"
        randio=python
        select_randio
    else
        die "BENCH_RANDIO=fio over TLS needs cc to build benches/nbd_allow_local.c"
    fi
fi

declare -A note    # per-server reasons for n/a cells
build_tidemark

if [[ " $servers " == *" tidemark "* && ! -x $tidemark_bin ]]; then
    add_note tidemark "no binary at $tidemark_bin${build_failed:+ (the build failed)}: not run"
    log "tidemark: no binary at $tidemark_bin; running the others"
    servers=$(for s in $servers; do [[ $s != tidemark ]] && printf '%s ' "$s"; done)
    [[ -n $servers ]] || die "no server to run"
fi

# TLS needs a tidemark that has it: say so once, and run its plain rows only.
tidemark_tls=yes
if [[ " $servers " == *" tidemark "* && -n $tls_modes && -x $tidemark_bin ]] &&
    ! "$tidemark_bin" serve --help 2>&1 | grep -q -- '--tls-creds'; then
    tidemark_tls=no
    add_note tidemark "this build has no TLS (\`tidemark serve --help\` lists no --tls-creds): its TLS rows did not run"
    log "tidemark: $tidemark_bin has no --tls-creds; its TLS rows are skipped"
fi

tls=$tmp/tls
log "certificates: tests/tls/gen-certs.sh $tls"
sh "$repo/tests/tls/gen-certs.sh" "$tls" || die "gen-certs.sh failed"

log "creating the $size_str raw image in $tmp"
t_build=$EPOCHREALTIME
fill "$tmp/disk.raw" "$size"
rm -f "$tmp/chunk"
if [[ " $formats " == *" qcow2 "* ]]; then
    log "converting it to qcow2"
    run "$op_timeout" qemu-img convert -f raw -O qcow2 -t unsafe "$tmp/disk.raw" "$tmp/disk.qcow2" ||
        die "qemu-img convert failed"
fi
sync
t_build=$(secs_since "$t_build")

# ---- servers ---------------------------------------------------------------

# What a start serves; set before each start_server.
cur_fmt='' cur_mode='' port=''

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

prepare_cache() {
    sync "$tmp/disk.$cur_fmt"
    cat "$tmp/disk.$cur_fmt" >/dev/null
}

server_cmd() { # server_cmd NAME SOCKET: sets the cmd array
    local tlsargs=() listen=(-k "$2")
    case $cur_mode in
    x509) tlsargs=(--object "tls-creds-x509,id=tls0,endpoint=server,dir=$(qemu_opt "$tls/server")" --tls-creds tls0) ;;
    psk) tlsargs=(--object "tls-creds-psk,id=tls0,endpoint=server,dir=$(qemu_opt "$tls/psk")" --tls-creds tls0) ;;
    esac
    case $1 in
    tidemark)
        [[ $transport == tcp ]] && listen=(--listen "127.0.0.1:$port")
        cmd=("$tidemark_bin" serve "${tlsargs[@]}" -e 16 "${listen[@]}" -f "$cur_fmt" "$tmp/disk.$cur_fmt")
        ;;
    qemu-nbd)
        [[ $transport == tcp ]] && listen=(-b 127.0.0.1 -p "$port")
        cmd=(qemu-nbd "${tlsargs[@]}" -t -e 16 "${listen[@]}" -f "$cur_fmt" "$tmp/disk.$cur_fmt")
        ;;
    esac
}

server_uri() { # server_uri SOCKET: the URI every client uses
    local q='' scheme=nbds user=''
    case $cur_mode in
    x509) q="tls-certificates=$tls/client" ;;
    psk) q="tls-psk-file=$tls/psk/keys.psk" user=alice@ ;;   # libnbd: the PSK identity is the URI's user
    plain) scheme=nbd ;;
    esac
    if [[ $transport == tcp ]]; then
        echo "$scheme://${user}127.0.0.1:$port/${q:+?$q}"
    else
        echo "$scheme+unix://$user/?socket=$1${q:+&$q}"
    fi
}

# ---- one measurement ---------------------------------------------------------

declare -A vals    # vals[SERVER,KEY] = the rounds' figures, space separated
declare -A res     # res[SERVER,KEY] = their median
declare -A mconn   # mconn[SERVER,FMT,MODE] = can_multi_conn as advertised
declare -A dead    # dead[SERVER,FMT,MODE]: failed to start; not tried again

add_val() { vals[$1,$2]+="${vals[$1,$2]:+ }$3"; log "$1: $2 = $3"; }

# measure SERVER ROUND: one start of SERVER on $cur_fmt / $cur_mode; the
# pull (seconds, server CPU seconds) and the random reads (IOPS, server CPU
# µs per read) go to vals under FMT,MODE,{pull_s,pull_cpu,rand_iops,rand_cpu}.
measure() {
    local s=$1 k=$cur_fmt,$cur_mode t0 t1 c0 c1 n0 n1 opts saved why
    read -ra opts <<<"$nbdcopy_opts"
    [[ $transport == tcp ]] && port=$(free_port)
    log "$s: $cur_fmt, $cur_mode, round $2: preparing page cache"
    prepare_cache
    saved=${note[$s]:-}
    start_server "$s" "$cur_fmt-$cur_mode-$2" || {
        why=${note[$s]:-did not start}
        note[$s]=$saved
        log "$s: $cur_fmt/$cur_mode: $why (not tried again)"
        add_note "$s" "$cur_fmt/$cur_mode: $why (see its log with BENCH_KEEP=1)"
        dead[$s,$k]=1
        return 1
    }
    mconn[$s,$k]=$(nbdinfo --can multi-conn "$uri" >/dev/null 2>&1 && echo yes || echo no)
    if [[ $warmup == 1 ]]; then
        log "$s: warm-up pull"
        run "$op_timeout" nbdcopy "${opts[@]}" "$uri" null: || { fail "$s" "$k" "warm-up pull failed"; return 1; }
    fi
    log "$s: pull"
    children_cpu n0
    c0=$(cpu_ticks) t0=$EPOCHREALTIME
    run "$op_timeout" nbdcopy "${opts[@]}" "$uri" null: || { fail "$s" "$k" "pull failed"; return 1; }
    t1=$EPOCHREALTIME c1=$(cpu_ticks)
    children_cpu n1
    add_val "$s" "$k,pull_s" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')"
    add_val "$s" "$k,pull_cpu" "$(awk -v t=$((c1 - c0)) -v hz="$clk_tck" 'BEGIN { printf "%.2f", t / hz }')"
    add_val "$s" "$k,pull_ccpu" "$(awk -v a="$n0" -v b="$n1" 'BEGIN { printf "%.2f", b - a }')"
    log "$s: random reads"
    c0=$(cpu_ticks) v=
    if rand_io read && [[ -n $v ]] && ((v > 0)); then
        c1=$(cpu_ticks)
        add_val "$s" "$k,rand_iops" "$v"
        add_val "$s" "$k,rand_cpu" "$(awk -v t=$((c1 - c0)) -v hz="$clk_tck" -v n="$v" -v secs="$rand_secs" \
            'BEGIN { printf "%.1f", t / hz * 1e6 / (n * secs) }')"
    else
        fail "$s" "$k" "random reads failed"
        return 1
    fi
    log "$s: stopping"
    stop_server
}

# children_cpu VAR: VAR = user + system seconds of this shell's waited-for
# children (bash's `times`, second line; run here, not in a subshell), so
# the difference across a pull is nbdcopy's (and timeout's) CPU time
children_cpu() {
    times >"$tmp/times"
    printf -v "$1" '%s' "$(awk 'NR == 2 {
        for (i = 1; i <= 2; i++) { split($i, p, "m"); sub(/s$/, "", p[2]); t += p[1] * 60 + p[2] }
        printf "%.3f", t }' "$tmp/times")"
}

fail() { # fail SERVER FMT,MODE WHAT
    local why=$3
    [[ -n $srv_pid ]] && ! kill -0 "$srv_pid" 2>/dev/null && why+=" (server died)"
    log "$1: $2: $why"
    add_note "$1" "${2/,//} round $round: $why"
    stop_server
}

# ---- the runs ---------------------------------------------------------------

read -ra order <<<"$servers"
t_runs=$EPOCHREALTIME
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
for ((round = 1; round <= rounds; round++)); do
    list=("${order[@]}")
    if ((round % 2 == 0)); then
        list=()
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do list+=("${order[i]}"); done
    fi
    for cur_fmt in $formats; do
        for cur_mode in $modes; do
            for s in "${list[@]}"; do
                [[ $s == tidemark && $cur_mode != plain && $tidemark_tls == no ]] && continue
                [[ -n ${dead[$s,$cur_fmt,$cur_mode]:-} ]] && continue
                measure "$s" "$round"
            done
        done
    done
done
t_runs=$(secs_since "$t_runs")

for key in "${!vals[@]}"; do
    # shellcheck disable=SC2086 # a list of numbers
    res[$key]=$(median ${vals[$key]})
done
# derived: MiB/s of the median pull
for s in $servers; do
    for f in $formats; do
        for m in $modes; do
            [[ -n ${res[$s,$f,$m,pull_s]:-} ]] &&
                res[$s,$f,$m,pull_mibs]=$(awk -v b="$size" -v t="${res[$s,$f,$m,pull_s]}" 'BEGIN { printf "%.0f", b / 1048576 / t }')
        done
    done
done

# ---- report -------------------------------------------------------------------

commit=$(checkout_id)
mode_text() {
    case $1 in
    x509) echo "TLS x509" ;;
    psk) echo "TLS PSK" ;;
    plain) echo "no TLS" ;;
    esac
}
num() { # num SERVER KEY FORMAT: the cell, formatted
    local v=${res[$1,$2]:-}
    [[ -n $v ]] || { echo n/a; return; }
    awk -v v="$v" -v f="$3" 'BEGIN { printf f, v }'
}
if [[ $transport == tcp ]]; then
    listen_t="-b 127.0.0.1 -p PORT" listen_d="--listen 127.0.0.1:PORT"
    uri_t="nbds://127.0.0.1:PORT/?tls-certificates=D/client"
    uri_p="nbds://alice@127.0.0.1:PORT/?tls-psk-file=D/psk/keys.psk"
else
    listen_t="-k S" listen_d="-k S"
    uri_t="nbds+unix:///?socket=S&tls-certificates=D/client"
    uri_p="nbds+unix://alice@/?socket=S&tls-psk-file=D/psk/keys.psk"
fi

cat <<EOF
## tidemark vs qemu-nbd over TLS

- host: $(nproc) CPUs, $(uname -sr), $(date -u '+%Y-%m-%d %H:%M UTC'); load average at the start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg); runs took ${t_runs}s
- image: $(numfmt --to=iec "$size") $formats, fully allocated (a 64 MiB random chunk repeated$([[ " $formats " == *" qcow2 "* ]] && echo "; the qcow2 converted from the raw, 64 KiB clusters"), built in ${t_build}s) on $(df --output=fstype "$tmp" | tail -n 1); before each start \`sync\` and the image read once (warm page cache)$([[ $warmup == 1 ]] && echo ", then one untimed pull through the server")
- certificates: \`tests/tls/gen-certs.sh D\` (RSA 2048, one CA), the same for both servers; PSK: D/psk/keys.psk, user alice
- tidemark ($commit): \`tidemark serve --object tls-creds-x509,id=tls0,endpoint=server,dir=D/server --tls-creds tls0 -e 16 $listen_d -f FMT IMG\`
- $(ver qemu-nbd --version): \`qemu-nbd --object tls-creds-x509,id=tls0,endpoint=server,dir=D/server --tls-creds tls0 -t -e 16 $listen_t -f FMT IMG\`
- PSK: \`--object tls-creds-psk,id=tls0,endpoint=server,dir=D/psk\`; no TLS: the same command lines without \`--object\` and \`--tls-creds\`
- pull: $(ver nbdcopy --version), \`nbdcopy${nbdcopy_opts:+ $nbdcopy_opts} '$uri_t' null:\` (PSK: \`$uri_p\`), wall time; nbdcopy opens several connections when the server advertises multi-conn
- random reads: $(if [[ $randio == fio ]]; then echo "$(fio --version) nbd engine$([[ -n $fio_preload ]] && echo " (over TLS with LD_PRELOAD=nbd_allow_local.so, which lets libnbd read the certificate files)")"; else echo "benches/randio.py (python3-libnbd aio)"; fi), 1 connection, bs=$bs_str, QD $qd, ${rand_secs}s, uniform over the whole export
- server CPU: utime + stime of the server process (all threads, /proc/PID/stat) across the timed load; client CPU: nbdcopy's user + system time (bash \`times\`). Client and server share the $(nproc) CPUs: the pull can go no faster than (server + client CPU) / $(nproc)
- $rounds rounds; servers alternate (odd rounds: $servers; even rounds reversed); each cell is the median over the rounds

| row | qemu-nbd | tidemark | tidemark vs qemu-nbd (>1x: tidemark better) |
|---|---:|---:|---:|
EOF
for f in $formats; do
    for m in $modes; do
        k=$f,$m what="$f, $(mode_text "$m")"
        printf '| %s: %s pull, nbdcopy → null: (s) | %s | %s | %s |\n' "$what" "$(numfmt --to=iec "$size")" \
            "$(num qemu-nbd "$k,pull_s" %.2f)" "$(num tidemark "$k,pull_s" %.2f)" "$(ratio qemu-nbd "$k,pull_s" tidemark)"
        printf '| … MiB/s | %s | %s | %s |\n' \
            "$(num qemu-nbd "$k,pull_mibs" %.0f)" "$(num tidemark "$k,pull_mibs" %.0f)" "$(ratio tidemark "$k,pull_mibs")"
        printf '| … server CPU during the pull (s) | %s | %s | %s |\n' \
            "$(num qemu-nbd "$k,pull_cpu" %.2f)" "$(num tidemark "$k,pull_cpu" %.2f)" "$(ratio qemu-nbd "$k,pull_cpu" tidemark)"
        printf '| … client (nbdcopy) CPU during the pull (s) | %s | %s | %s |\n' \
            "$(num qemu-nbd "$k,pull_ccpu" %.2f)" "$(num tidemark "$k,pull_ccpu" %.2f)" "$(ratio qemu-nbd "$k,pull_ccpu" tidemark)"
        printf '| %s: %s random read, QD %s (IOPS) | %s | %s | %s |\n' "$what" "$bs_str" "$qd" \
            "$(num qemu-nbd "$k,rand_iops" %.0f)" "$(num tidemark "$k,rand_iops" %.0f)" "$(ratio tidemark "$k,rand_iops")"
        printf '| … server CPU per read (µs) | %s | %s | %s |\n' \
            "$(num qemu-nbd "$k,rand_cpu" %.1f)" "$(num tidemark "$k,rand_cpu" %.1f)" "$(ratio qemu-nbd "$k,rand_cpu" tidemark)"
    done
done

echo
echo "Ratios: seconds and CPU are qemu-nbd / tidemark, MiB/s and IOPS tidemark / qemu-nbd."
if [[ " $modes " == *" x509 "* ]]; then
    for f in $formats; do
        r=$(ratio qemu-nbd "$f,x509,pull_s" tidemark)
        [[ $r == n/a ]] && continue
        verdict=$(awk -v r="${r%x}" 'BEGIN { print (r >= 1.5 ? "goal 1.5x met" : r >= 1.0 ? "target 1.0x met, goal 1.5x not" : "below the 1.0x target") }')
        echo "$f x509 pull: tidemark ${r} qemu-nbd's speed ($verdict); random reads ${f} x509: $(ratio tidemark "$f,x509,rand_iops")."
    done
fi
if [[ " $modes " == *" plain "* && -n $tls_modes ]]; then
    echo
    echo "What TLS costs each server (TLS / no TLS, medians):"
    echo
    for f in $formats; do
        for m in $tls_modes; do
            for s in qemu-nbd tidemark; do
                a=${res[$s,$f,$m,pull_s]:-} b=${res[$s,$f,plain,pull_s]:-}
                c=${res[$s,$f,$m,rand_iops]:-} d=${res[$s,$f,plain,rand_iops]:-}
                [[ -n $a && -n $b && -n $c && -n $d ]] || continue
                awk -v s="$s" -v w="$f, $(mode_text "$m")" -v a="$a" -v b="$b" -v c="$c" -v d="$d" \
                    'BEGIN { printf "- %s, %s: pull time %.2fx, random-read IOPS %.2fx\n", s, w, a / b, c / d }'
            done
        done
    done
fi
echo
echo "Each round (in run order per round; pull s / IOPS):"
echo
for f in $formats; do
    for m in $modes; do
        for s in qemu-nbd tidemark; do
            [[ -n ${vals[$s,$f,$m,pull_s]:-} ]] || continue
            echo "- $s, $f, $(mode_text "$m"): pull ${vals[$s,$f,$m,pull_s]// /, } s; IOPS ${vals[$s,$f,$m,rand_iops]:-n/a}; multi-conn ${mconn[$s,$f,$m]:-n/a}"
        done
    done
done
for s in qemu-nbd tidemark; do
    [[ -n ${note[$s]:-} ]] && echo "- $s: ${note[$s]}"
    [[ " $servers_asked " != *" $s "* ]] && echo "- $s: not run (BENCH_SERVERS)"
done
exit 0
