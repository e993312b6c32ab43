#!/usr/bin/env bash
# Set up a fresh machine and run the whole domkit test suite:
#   1. install the Debian packages (scripts/install-deps.sh); lint (fmt, clippy, rustdoc)
#   2. build the QEMU test guest (scripts/build-test-guest.sh, cached)
#   3. cargo test for the QEMU side: core, domkit-qemu (real QEMU + real qemu-ga + the test
#      guest, TCG), the conformance suite on QEMU, the CLI
#   4. the Xen side: libxenlight-sys + domkit-libxl unit tests on the host, then, in the
#      background while step 3 runs, the libxl integration tests then domkitd's libxl tests,
#      and the conformance suite on libxl, each inside a real Xen 4.17 host booted nested
#      under QEMU TCG (xen-host/)
# Ends with one line `domkit-tests: N passed, M failed, K skipped`; exits non-zero on any
# failure. Set DOMKIT_SKIP_XEN=1 to skip step 4 (it is then reported as skipped, not passed).
# Set DOMKIT_RECORD_DIR=DIR to keep both conformance results records there (qemu.json,
# libxl.json: what docs/conformance/ holds and scripts/status-table.py reads).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -n "${DOMKIT_RECORD_DIR:-}" ] && mkdir -p "$DOMKIT_RECORD_DIR"
root=$(pwd)
logdir=$(mktemp -d)
log=$logdir/cargo.log      # cargo's own `test result:` lines are counted from here
xenlog=$logdir/xen.log     # only the harness's `xen-host:` summary is counted from here
xenconflog=$logdir/xen-conformance.log  # and its `xen-conformance:` line from here
xendaemonlog=$logdir/xen-daemon.log  # and the domkitd-in-dom0 run's `xen-host:` line from here
fail=0
stage() { printf '\n==== %s ====\n' "$*"; }
run() { # run LOGFILE CMD...: tee the output into LOGFILE, remember failure
  local into=$1; shift
  "$@" 2>&1 | tee -a "$into"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "!!!! FAILED (rc=$rc): $*" | tee -a "$into"; fail=1; fi
  return 0
}

stage "install dependencies"
bash scripts/install-deps.sh all || { echo "dependency installation failed"; exit 1; }
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)"; exit 1; }

stage "build the QEMU test guest"
guest_dir=$(bash scripts/build-test-guest.sh | tail -n 1) || { echo "test guest build failed"; exit 1; }
export DOMKIT_GUEST_DIR="$guest_dir"
echo "test guest: $DOMKIT_GUEST_DIR"

stage "lint: rustfmt, clippy -D warnings, rustdoc -D warnings"
run "$log" cargo fmt --all -- --check
if [ "${DOMKIT_SKIP_XEN:-0}" = 1 ]; then lint_scope=(); else lint_scope=(--workspace); fi
# With Xen, domkitd's libxl code and its dom0 tests (daemon/tests/libxl.rs) too.
if [ "${DOMKIT_SKIP_XEN:-0}" = 1 ]; then lint_features=(); else lint_features=(--features domkitd/libxl); fi
run "$log" cargo clippy "${lint_scope[@]}" "${lint_features[@]}" --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" run "$log" cargo doc "${lint_scope[@]}" --no-deps -q

stage "build the tests (QEMU side) and the domkit CLI"
# Built first, run later without cargo (scripts/run-test-binaries.py): `cargo test` would hold
# the target directory's lock while its tests run, and the Xen side, which runs meanwhile,
# builds its payload with cargo.
build_json=$logdir/tests-build.json
# With Xen, domkitd is built with libxl (as xen-host/run-daemon-tests.sh builds it for the
# dom0, so its build there is a no-op): on this host it only logs "not a Xen dom0".
if [ "${DOMKIT_SKIP_XEN:-0}" = 1 ]; then daemon_features=(); else daemon_features=(--features domkitd/libxl); fi
if ! cargo test --no-run --workspace --exclude libxenlight-sys --exclude domkit-libxl \
  "${daemon_features[@]}" --message-format=json-render-diagnostics >"$build_json"; then
  echo "!!!! FAILED: building the tests" | tee -a "$log"
  fail=1
fi
# The manager process of the durable scenarios (both backends); with libxl, the same binary
# the Xen side puts in its dom0 (so that build is a no-op there).
if [ "${DOMKIT_SKIP_XEN:-0}" = 1 ]; then cli_features=(); else cli_features=(--features libxl); fi
run "$log" cargo build -p domkit-examples "${cli_features[@]}" --bin domkit
export DOMKIT_BIN=${CARGO_TARGET_DIR:-$root/target}/debug/domkit

skipped=0
xen_pid=
if [ "${DOMKIT_SKIP_XEN:-0}" = 1 ]; then
  stage "Xen side SKIPPED (DOMKIT_SKIP_XEN=1)"
  skipped=1
else
  stage "cargo test (libxenlight-sys, domkit-libxl unit tests, on the host)"
  run "$log" cargo test --no-fail-fast -p libxenlight-sys -p domkit-libxl
  stage "the Xen side starts in the background (two nested Xen hosts): libxl integration tests, and conformance on libxl"
  # Its output goes to its own logs, printed after the QEMU side; both share the 2 cores,
  # but most of either side's time is spent waiting on TCG guests.
  # Two nested Xen hosts at once (each ~3-5 GiB of RAM): the conformance suite is the CI's
  # longest part, and the integration tests need not wait for it.
  (
    bash xen-host/run-conformance.sh ${DOMKIT_RECORD_DIR:+--record "$DOMKIT_RECORD_DIR/libxl.json"} >"$xenconflog" 2>&1 || echo "!!!! FAILED (rc=$?): xen-host/run-conformance.sh" >>"$xenconflog"
  ) &
  xen_pid=$!
  (
    bash xen-host/run-libxl-tests.sh >"$xenlog" 2>&1 || echo "!!!! FAILED (rc=$?): xen-host/run-libxl-tests.sh" >>"$xenlog"
    # domkitd serving Xen domains (issue 13), in a third boot of the host, after the
    # integration tests: the conformance suite is the longer of the two jobs.
    bash xen-host/run-daemon-tests.sh >"$xendaemonlog" 2>&1 || echo "!!!! FAILED (rc=$?): xen-host/run-daemon-tests.sh" >>"$xendaemonlog"
  ) &
  xen_pid="$xen_pid $!"
fi

stage "tests: core, QEMU driver, conformance on QEMU, CLI (doc tests, then the test binaries)"
run "$log" cargo test --doc --no-fail-fast --workspace --exclude libxenlight-sys --exclude domkit-libxl
# Two conformance scenarios at a time (each has its own domains and roots).
export DOMKIT_CONFORMANCE_JOBS=${DOMKIT_CONFORMANCE_JOBS:-2}
[ -n "${DOMKIT_RECORD_DIR:-}" ] && export DOMKIT_CONFORMANCE_RECORD=$DOMKIT_RECORD_DIR/qemu.json
run "$log" python3 scripts/run-test-binaries.py "$build_json" -- --test-threads=2

if [ -n "$xen_pid" ]; then
  stage "the Xen side (waiting for it to finish)"
  # shellcheck disable=SC2086 # two pids
  wait $xen_pid
  cat "$xenlog"
  stage "domkitd serving Xen domains, inside a nested Xen host"
  cat "$xendaemonlog"
  stage "conformance suite on libxl, inside a nested Xen host"
  cat "$xenconflog"
  grep -q '^!!!! FAILED' "$xenlog" "$xendaemonlog" "$xenconflog" && fail=1
fi

# Sum every runner's counts: cargo's `test result:` lines, and `xen-host:` lines.
read -r passed failed ignored < <(awk '
  /test result:/ { for (i=1;i<=NF;i++) { if ($(i+1) ~ /^passed/) p+=$i; if ($(i+1) ~ /^failed/) f+=$i; if ($(i+1) ~ /^ignored/) g+=$i } }
  END { print p+0, f+0, g+0 }' "$log")
if [ -s "$xenlog" ]; then
  read -r xp xf < <(awk '/^xen-host: [0-9]+ passed, [0-9]+ failed/ { p=$2; f=$4 } END { print p+0, f+0 }' "$xenlog")
  passed=$((passed + xp)); failed=$((failed + xf))
  grep -q '^xen-host: [0-9]* passed' "$xenlog" || { echo "the Xen host run printed no result line"; fail=1; }
fi
if [ -s "$xendaemonlog" ]; then
  read -r xp xf < <(awk '/^xen-host: [0-9]+ passed, [0-9]+ failed/ { p=$2; f=$4 } END { print p+0, f+0 }' "$xendaemonlog")
  passed=$((passed + xp)); failed=$((failed + xf))
  grep -q '^xen-host: [0-9]* passed' "$xendaemonlog" || { echo "the domkitd Xen host run printed no result line"; fail=1; }
fi
if [ -s "$xenconflog" ]; then
  read -r cp cf cs < <(awk '/^xen-conformance: [0-9]+ passed/ { p=$2; f=$4; s=$6 } END { print p+0, f+0, s+0 }' "$xenconflog")
  passed=$((passed + cp)); failed=$((failed + cf)); skipped=$((skipped + cs))
  grep -q '^xen-conformance: ' "$xenconflog" || { echo "the Xen conformance run printed no result line"; fail=1; }
fi
[ "$failed" -gt 0 ] && fail=1
echo
echo "(ignored on the host: $ignored tests that need a Xen dom0; they run inside the nested Xen host above)"
echo "domkit-tests: $passed passed, $failed failed, $((skipped)) skipped"
exit $fail
