#!/usr/bin/env bash
# Set up a fresh machine and run the main job: `domkit demo`, a real VM lifecycle on QEMU
# (TCG unless KVM really works) through a private domkitd it starts and stops: boot the test
# guest, pause, resume, save, restore, reboot, graceful shutdown, printing each uniform event
# (from the daemon's event stream) with timings.
# Extra arguments go to `domkit demo` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh base
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }
DOMKIT_GUEST_DIR=$(bash scripts/build-test-guest.sh | tail -n 1)
export DOMKIT_GUEST_DIR
# `domkit demo` starts a private domkitd (found beside the domkit binary) and drives the
# lifecycle through it, as users run domkit.
cargo build --release -q -p domkit-examples --bin domkit
cargo build --release -q -p domkitd --bin domkitd
target_dir=${CARGO_TARGET_DIR:-target}
exec "$target_dir/release/domkit" demo "$@"
