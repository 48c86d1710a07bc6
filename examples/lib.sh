# What the examples share; sourced by them, not run on its own.
# shellcheck shell=bash disable=SC2154  # uri and work are the caller's

# The tidemark binary: $TIDEMARK, or target/release/tidemark built now.
tidemark_binary() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [ -n "${TIDEMARK:-}" ]; then
    echo "$TIDEMARK"
    return
  fi
  cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
  echo "$repo/target/release/tidemark"
}

# guest WRITE...: each qemu-io command (write -P / write -z) goes through the
# export at $uri and, the same, into $work/expected.raw. qemu-io's exit status
# does not tell a failed write: its output must be free of errors.
guest() {
  local args=() c out
  for c in "$@"; do args+=(-c "$c"); done
  out=$(qemu-io -f raw "${args[@]}" "$uri" 2>&1) || { echo "$out" >&2; exit 1; }
  if grep -qiE 'error|fail' <<<"$out"; then echo "$out" >&2; exit 1; fi
  qemu-io -f raw "${args[@]}" "$work/expected.raw" >/dev/null
  printf '  guest: %s\n' "$@"
}
