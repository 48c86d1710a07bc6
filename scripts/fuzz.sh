#!/bin/sh
# Coverage-guided fuzzing: runs every cargo-fuzz target in fuzz/ for
# SECONDS each (default 60), starting from the committed seeds
# (fuzz/seeds/TARGET) plus what earlier runs found (fuzz/corpus/TARGET).
# Fails if any target crashes, hangs, or exceeds its memory bound; the
# input that did is left in fuzz/artifacts/TARGET/.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -eu
SECS=${1:-60}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi

# -a: debug assertions and overflow checks on, as in a debug build.
FLAGS="-a"
cargo +nightly fuzz build $FLAGS

# Largest input per target: a few protocol messages, one header cluster,
# or a whole small image.
max_len() {
    case $1 in
    nbd_handshake) echo 8192 ;;
    nbd_transmission) echo 65536 ;;
    qmp_input) echo 16384 ;;
    qcow2_header) echo 8192 ;;
    qcow2_tables) echo 4097 ;;
    qcow2_bitmap_dir) echo 16384 ;;
    qcow2_image) echo 524288 ;;
    *) echo 65536 ;;
    esac
}

TARGETS=${*:-$(cargo +nightly fuzz list)}
LOGS=fuzz/logs
mkdir -p "$LOGS"
failed=""
summary=""
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t"
    log="$LOGS/$t.log"
    echo "== $t: ${SECS}s"
    if cargo +nightly fuzz run $FLAGS "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECS" -max_len="$(max_len "$t")" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed="$failed $t"
        # The failing input is dumped in full; its name is what matters.
        grep -v "^\s*\[" "$log" | tail -n 40 | cut -c1-300 >&2
    fi
    # libFuzzer's last status line: coverage, features, corpus, speed.
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(echo "$last" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$last" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    speed=$(echo "$last" | sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p')
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    summary="$summary$(printf '%-18s %-6s runs=%-9s exec/s=%-7s cov=%-6s ft=%s' \
        "$t" "$status" "${runs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}")
"
done

echo
echo "fuzz summary (${SECS}s per target; logs in $LOGS/):"
printf '%s' "$summary"
if [ -n "$failed" ]; then
    echo "fuzz.sh: FAILED:$failed (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
