#!/usr/bin/env bash
# Build domkitd (with its `libxl` feature), the domkit CLI and domkitd's libxl tests
# (daemon/tests/libxl.rs) on this host and run them inside the nested Xen 4.17 host
# (xen-host/run.sh): a real domkitd serving Xen domains over its real socket, driven by the
# real CLI, in a real dom0.
#
# Usage: xen-host/run-daemon-tests.sh [--log FILE] [--timeout SECS] [-- TEST-ARGS...]
#   TEST-ARGS go to the test binary after `--ignored --test-threads=1` (e.g. a name filter).
# Exit: the test binary's exit code (run.sh's codes for boot failures: 124, 125).
# Last lines: run.sh's summary, including "xen-host: N passed, M failed".
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
me=xen-host/run-daemon-tests.sh
log= timeout=900
while [ $# -gt 0 ]; do
  case "$1" in
    --log) [ $# -ge 2 ] || exit 2; log=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || exit 2; timeout=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "$me: unknown argument: $1 (test arguments go after --)" >&2; exit 2 ;;
  esac
done
command -v python3 >/dev/null || { echo "$me: python3 is needed to read cargo's JSON output" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/domkit-daemon-tests.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
[ -n "$log" ] || log=$tmp/serial.log

echo "$me: building domkitd, the domkit CLI and the test binary" >&2
# The same selection and features as scripts/test.sh's QEMU-side build, so that inside CI
# this is a no-op and replaces none of the binaries the QEMU side is running.
(cd "$root" && cargo test --no-run --workspace --exclude libxenlight-sys --exclude domkit-libxl \
  --features domkitd/libxl --message-format=json) >"$tmp/cargo.json"
(cd "$root" && cargo build -p domkit-examples --features libxl --bin domkit --message-format=json) \
  >"$tmp/cli.json"
pick() { # pick JSON TARGET-NAME KIND: the executable cargo reported
  python3 -c '
import json, sys
exe = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
       t.get("name") == sys.argv[2] and sys.argv[3] in t.get("kind", []) and \
       m.get("profile", {}).get("test") == (sys.argv[3] == "test"):
        # (a bin target is also built as its unit-test harness: profile.test tells them apart)
        exe = m["executable"]
print(exe or "")
' "$@"
}
test_bin=$(pick "$tmp/cargo.json" libxl test)
daemon_bin=$(pick "$tmp/cargo.json" domkitd bin)
cli_bin=$(pick "$tmp/cli.json" domkit bin)
for b in "$test_bin" "$daemon_bin" "$cli_bin"; do
  [ -n "$b" ] && [ -x "$b" ] || { echo "$me: cargo did not report a binary (test '$test_bin', domkitd '$daemon_bin', domkit '$cli_bin')" >&2; exit 2; }
done

mkdir -p "$tmp/payload"
cp "$test_bin" "$tmp/payload/daemon_libxl"
cp "$daemon_bin" "$tmp/payload/domkitd"
cp "$cli_bin" "$tmp/payload/domkit"
# Debug info only makes the dom0 initramfs bigger (and slower to unpack under TCG).
for f in daemon_libxl domkitd domkit; do objcopy --strip-debug "$tmp/payload/$f" 2>/dev/null || true; done

envs=(--env "DOMKIT_DOMKITD_BIN=/payload/domkitd" --env "DOMKIT_CLI_BIN=/payload/domkit")
# run.sh can die of SIGPIPE (141) before booting: retry then, as nothing ran yet.
for attempt in 1 2 3; do
  rc=0
  rm -f "$log"
  "$here/run.sh" --payload "$tmp/payload" --timeout "$timeout" --log "$log" "${envs[@]}" -- \
    sh -c './daemon_libxl "$@"; rc=$?; if [ $rc -ge 128 ]; then echo "== dmesg (killed by a signal) =="; dmesg | tail -n 20; fi; exit $rc' \
    sh --ignored --test-threads=1 --nocapture "$@" || rc=$?
  if [ "$rc" = 141 ] && [ ! -s "$log" ]; then
    echo "$me: run.sh died of SIGPIPE before booting (attempt $attempt); retrying" >&2
    continue
  fi
  break
done
exit "$rc"
