#!/usr/bin/env bash
# Set up a fresh machine and run the main job: `domkit demo`, a real VM lifecycle on QEMU
# (TCG unless KVM really works): boot the test guest, pause, resume, save, restore, reboot,
# graceful shutdown, printing each uniform event with timings.
# Extra arguments go to `domkit demo` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh base
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }
DOMKIT_GUEST_DIR=$(bash scripts/build-test-guest.sh | tail -n 1)
export DOMKIT_GUEST_DIR
cargo build --release -q -p domkit-examples --bin domkit
exec target/release/domkit demo "$@"
