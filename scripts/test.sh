#!/usr/bin/env bash
# The whole test suite, as a new user or CI runs it: installs the Debian
# packages the tests drive, then lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the integration tests use as clients and oracles. qemu-utils
# (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon) is already on the machine;
# never install qemu-system-* from plain bookworm: it replaces qemu-utils.
packages=(libnbd-bin python3-libnbd nbdkit fio python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon nbdinfo nbdcopy nbdsh; do
  command -v "$tool" >/dev/null || { echo "missing $tool (install qemu-utils)" >&2; exit 1; }
done

[ -x target/qmp-venv/bin/python ] || { /usr/bin/python3 -m venv target/qmp-venv && target/qmp-venv/bin/pip install -q qemu.qmp; } || echo "qemu.qmp not installed: tests/qmp_python_client.rs will skip" >&2
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --release --no-fail-fast 2>&1
# Fuzz smoke pass (5 s per target; ~4 min from a cold build, see README "Fuzzing").
if cargo +nightly --version >/dev/null 2>&1; then scripts/fuzz.sh 5; else echo "no nightly toolchain: fuzz smoke pass skipped" >&2; fi
