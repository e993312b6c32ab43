#!/usr/bin/env bash
# Build the libxl driver's integration tests on this host and run them inside the nested Xen
# 4.17 host (xen-host/run.sh), where they talk to a real libxl toolstack.
#
# Usage: xen-host/run-libxl-tests.sh [--log FILE] [--timeout SECS] [--record] [-- TEST-ARGS...]
#   TEST-ARGS go to the test binary after `--ignored --test-threads=1` (e.g. a name filter).
#   --record  writes the traces the tests print (DOMKIT-LIBXL-TRACE) to
#             driver-libxl/tests/fixtures/xen417_traces.json and the domain infos
#             (DOMKIT-LIBXL-DOMINFO, t40) to .../xen417_dominfo.json and the statistics
#             readings (DOMKIT-LIBXL-STATS, t42) to .../xen417_stats.json (the unit tests
#             replay them).
# Env: DOMKIT_LOG (tracing filter inside dom0, default "info,libxl=warn").
# Exit: the test binary's exit code (run.sh's codes for boot failures: 124, 125).
# Last lines: run.sh's summary, including "xen-host: N passed, M failed".
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
me=xen-host/run-libxl-tests.sh
# 7 min on a quiet machine; a CI dry run at load 20-28 (helpers' Xen hosts beside it) took
# more than 900 s.
log= timeout=1800 record=0
while [ $# -gt 0 ]; do
  case "$1" in
    --log) [ $# -ge 2 ] || exit 2; log=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || exit 2; timeout=$2; shift 2 ;;
    --record) record=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "$me: unknown argument: $1 (test arguments go after --)" >&2; exit 2 ;;
  esac
done
command -v python3 >/dev/null || { echo "$me: python3 is needed to read cargo's JSON output" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/domkit-libxl-tests.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
[ -n "$log" ] || log=$tmp/serial.log

echo "$me: building the test binary" >&2
# crc32fast optimised even in this debug build: unoptimised it is ~20x slower, far
# less under TCG, and every save and restore hashes its whole stream (savefile.rs).
(cd "$root" && cargo test --config "profile.dev.package.crc32fast.opt-level=3" -p domkit-libxl --test libxl_integration --no-run --message-format=json) \
  >"$tmp/cargo.json"
bin=$(python3 -c '
import json, sys
exe = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and \
       m.get("target", {}).get("name") == "libxl_integration":
        exe = m["executable"]
print(exe or "")
' "$tmp/cargo.json")
[ -n "$bin" ] && [ -x "$bin" ] || { echo "$me: cargo did not report the test binary" >&2; exit 2; }

mkdir -p "$tmp/payload"
cp "$bin" "$tmp/payload/libxl_integration"
# Debug info only makes the dom0 initramfs bigger (and slower to unpack under TCG).
objcopy --strip-debug "$tmp/payload/libxl_integration" 2>/dev/null || true

envs=(--env "DOMKIT_LOG=${DOMKIT_LOG:-info,libxl=warn}")
# run.sh can die of SIGPIPE (141) before booting (`ldconfig -p | awk '...; exit'` under
# pipefail, xen-host/run.sh:123): retry then, as nothing ran yet.
for attempt in 1 2 3; do
  rc=0
  rm -f "$log"
  "$here/run.sh" --payload "$tmp/payload" --timeout "$timeout" --log "$log" "${envs[@]}" -- \
    sh -c './libxl_integration "$@"; rc=$?; if [ $rc -ge 128 ]; then echo "== dmesg (killed by a signal) =="; dmesg | tail -n 20; fi; exit $rc' \
    sh --ignored --test-threads=1 --nocapture "$@" || rc=$?
  if [ "$rc" = 141 ] && [ ! -s "$log" ]; then
    echo "$me: run.sh died of SIGPIPE before booting (attempt $attempt); retrying" >&2
    continue
  fi
  break
done

if [ "$record" = 1 ]; then
  out=$root/driver-libxl/tests/fixtures/xen417_traces.json
  python3 - "$log" "$out" <<'EOF'
import json, sys
traces = []
for line in open(sys.argv[1], errors="replace"):
    i = line.find("DOMKIT-LIBXL-TRACE ")
    if i >= 0:
        try:
            traces.append(json.loads(line[i + len("DOMKIT-LIBXL-TRACE "):]))
        except ValueError:
            pass
if traces:
    with open(sys.argv[2], "w") as f:
        json.dump(traces, f, indent=1)
        f.write("\n")
print(f"recorded {len(traces)} trace(s) to {sys.argv[2]}", file=sys.stderr)
EOF
  # libxl_domain_info of a domain in each condition (t40), replayed by reattach.rs's tests.
  python3 - "$log" "$root/driver-libxl/tests/fixtures/xen417_dominfo.json" <<'EOF'
import json, sys
cases = []
for line in open(sys.argv[1], errors="replace"):
    i = line.find("DOMKIT-LIBXL-DOMINFO ")
    if i >= 0:
        try:
            cases.append(json.loads(line[i + len("DOMKIT-LIBXL-DOMINFO "):]))
        except ValueError:
            pass
if cases:
    with open(sys.argv[2], "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
print(f"recorded {len(cases)} domain info case(s) to {sys.argv[2]}", file=sys.stderr)
EOF
  # Statistics readings of a running domU (t42), replayed by stats.rs's tests.
  python3 - "$log" "$root/driver-libxl/tests/fixtures/xen417_stats.json" <<'EOF'
import json, sys
cases = []
for line in open(sys.argv[1], errors="replace"):
    i = line.find("DOMKIT-LIBXL-STATS ")
    if i >= 0:
        try:
            cases.append(json.loads(line[i + len("DOMKIT-LIBXL-STATS "):]))
        except ValueError:
            pass
if cases:
    with open(sys.argv[2], "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
print(f"recorded {len(cases)} stats reading(s) to {sys.argv[2]}", file=sys.stderr)
EOF
fi
grep -h "DOMKIT-LIBXL-TIMING" "$log" | sed 's/.*DOMKIT-LIBXL-TIMING/timing:/' >&2 || true
exit "$rc"
