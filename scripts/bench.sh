#!/usr/bin/env bash
# domkit-bench on a fresh machine, in one command (issue 6):
#   1. Debian packages: scripts/deps/base.txt + bench.txt (QEMU, python venv/pip)
#   2. the peers: python qemu.qmp (PyPI, into a venv) and, if it can be installed and
#      started here, libvirt (Debian's libvirt-daemon-system + python3-libvirt)
#   3. cargo build --release, then the bench: QMP round trips, events, start, scale
#   4. results: docs/bench/<mode>.json (one key per figure) and, in full mode, the tables
#      spliced into docs/performance.md
#
# Usage: scripts/bench.sh [--quick] [extra domkit-bench options, e.g. --reps 9]
#   --quick          CI mode (< 2 minutes of bench)
#   DOMKIT_BENCH_NO_LIBVIRT=1   skip libvirt (no install, no daemon)
#   DOMKIT_BENCH_VENV=DIR       the python venv (default ~/.cache/domkit/bench-venv)
#
# libvirt is installed here, not through scripts/deps/*.txt, on purpose: those lists are
# installed by every test run (scripts/test.sh), which must not get a system daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

mode=full
args=()
for a in "$@"; do
  case "$a" in
    --quick) mode=quick; args+=(--quick) ;;
    *) args+=("$a") ;;
  esac
done
log() { printf 'bench.sh: %s\n' "$*" >&2; }

log "installing Debian packages (base, bench)"
bash scripts/install-deps.sh base bench >&2
command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup)"; exit 1; }

# ---- python qemu.qmp: a venv on Debian's python (so Debian's python3-libvirt is visible)
venv="${DOMKIT_BENCH_VENV:-$HOME/.cache/domkit/bench-venv}"
if [ ! -x "$venv/bin/python" ]; then
  log "creating the python venv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -c 'import qemu.qmp' 2>/dev/null \
  || { log "pip install qemu.qmp"; "$venv/bin/pip" install -q 'qemu.qmp==0.0.6' >&2; }

# ---- libvirt: install, then start a daemon of our own if none answers
libvirt_args=()
started_libvirtd=""
started_virtlogd=""
stop_daemons() {
  if [ -n "$started_libvirtd" ] && [ -s /run/domkit-bench-libvirtd.pid ]; then
    kill "$(cat /run/domkit-bench-libvirtd.pid)" 2>/dev/null || true
  fi
  if [ -n "$started_virtlogd" ] && [ -s /run/domkit-bench-virtlogd.pid ]; then
    kill "$(cat /run/domkit-bench-virtlogd.pid)" 2>/dev/null || true
  fi
}
libvirt_unavailable() { log "libvirt unavailable: $*"; libvirt_args=(--libvirt-unavailable "$*"); }

have_libvirt() {
  local p
  for p in libvirt-daemon-system libvirt-clients python3-libvirt; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || return 1
  done
}
install_libvirt() {
  log "installing libvirt (libvirt-daemon-system, libvirt-clients, python3-libvirt)"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends libvirt-daemon-system libvirt-clients python3-libvirt >&2
}

if [ "${DOMKIT_BENCH_NO_LIBVIRT:-0}" = 1 ]; then
  libvirt_args=(--no-libvirt)
elif ! have_libvirt && ! install_libvirt; then
  libvirt_unavailable "apt-get install libvirt-daemon-system python3-libvirt failed"
elif timeout 20 virsh -c qemu:///system version >/dev/null 2>&1; then
  log "using the running libvirtd"
else
  # No init system starts it in a container: start it ourselves, stopped again on exit.
  # Its QEMUs run as root (qemu.conf user/group, in a private mount namespace so the
  # system file stays untouched): /dev/kvm is root-only (0600) here, and with the default
  # user libvirt-qemu libvirt sees KVM at probe time but not when checking its capability
  # cache, so it re-probes QEMU (~36 s) before every single domain start.
  trap stop_daemons EXIT
  conf=$(mktemp /tmp/domkit-bench-qemu.conf.XXXXXX)
  { cat /etc/libvirt/qemu.conf 2>/dev/null; printf 'user = "root"\ngroup = "root"\n'; } > "$conf"
  if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d -p /run/domkit-bench-virtlogd.pid && started_virtlogd=1 || true
  fi
  if unshare -m --propagation private sh -c \
       "mount --bind '$conf' /etc/libvirt/qemu.conf && exec libvirtd -d -p /run/domkit-bench-libvirtd.pid"; then
    started_libvirtd=1
    for _ in $(seq 1 50); do
      timeout 5 virsh -c qemu:///system version >/dev/null 2>&1 && break
      sleep 0.2
    done
  fi
  if ! timeout 20 virsh -c qemu:///system version >/dev/null 2>&1; then
    libvirt_unavailable "libvirtd did not start (see /var/log/libvirt/libvirtd.log)"
  fi
fi

log "building domkit-bench (release)"
# `--only daemon` also runs the domkitd and domkit binaries beside domkit-bench (and, with
# libvirt up, `virsh domstate` of a paused libvirt domain side by side).
cargo build --release -q -p domkit-examples --bin domkit-bench --bin domkit >&2
cargo build --release -q -p domkitd --bin domkitd >&2
bin=$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
      | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/domkit-bench

out=(--json "docs/bench/$mode.json")
[ "$mode" = full ] && out+=(--update-doc docs/performance.md)
# The libxl-vs-xl figures come from scripts/bench-xen.sh (a nested Xen host, ~5-20 min).
[ -f docs/bench/xen.json ] && out+=(--xen-json docs/bench/xen.json)
cmd="scripts/bench.sh${*:+ $*}"
log "running: domkit-bench ${args[*]:-} (log: stderr)"
# Every QEMU the bench spawns dies with it (parent-death signal); the timeout bounds a hang.
limit=1800; [ "$mode" = quick ] && limit=300
status=0
timeout --kill-after=30 "$limit" "$bin" "${args[@]}" "${libvirt_args[@]}" "${out[@]}" \
  --python "$venv/bin/python" --peer-script "$root/scripts/bench/peer.py" \
  --command "$cmd" || status=$?
# A libvirt domain left by an interrupted run would keep its QEMU: remove it.
if command -v virsh >/dev/null && timeout 10 virsh -c qemu:///system version >/dev/null 2>&1; then
  for d in $(timeout 10 virsh -c qemu:///system list --name 2>/dev/null | grep '^domkit-bench-' || true); do
    timeout 10 virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
  done
fi
log "results: docs/bench/$mode.json${started_libvirtd:+ (libvirtd stopped again)}"
exit "$status"
