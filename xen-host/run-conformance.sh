#!/usr/bin/env bash
# Run domkit's conformance suite against the libxl backend inside the nested Xen 4.17 host.
#
# Usage: xen-host/run-conformance.sh [--record FILE] [--only PATTERN] [--log FILE]
#   Builds `domkit` with the libxl feature on the host, boots the Xen host (xen-host/run.sh)
#   with it as the payload, runs `domkit --connect libxl:/// conformance` in dom0, and brings
#   the JSON report back through the serial log. --record FILE writes it on the host (e.g.
#   docs/conformance/libxl.json for scripts/status-table.py).
# Last line: "xen-conformance: N passed, M failed, K skipped" (K = unsupported: gaps).
# Exit: 0 when no scenario failed.
set -euo pipefail
cd "$(dirname "$0")/.."
me=xen-host/run-conformance.sh
record= only= log=
while [ $# -gt 0 ]; do
  case "$1" in
    --record) record=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    *) echo "$me: unknown argument $1" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
[ -n "$log" ] || log=$work/serial.log

echo "$me: building domkit with the libxl backend"
# crc32fast optimised even in this debug build (see run-libxl-tests.sh).
cargo build -q --config "profile.dev.package.crc32fast.opt-level=3" -p domkit-examples --features libxl --bin domkit
target=${CARGO_TARGET_DIR:-target}
mkdir -p "$work/payload"
cp "$target/debug/domkit" "$work/payload/domkit"

only_args=""
[ -n "$only" ] && only_args="--only $only"
case "$only" in *[!A-Za-z0-9_,]*) echo "$me: --only takes [A-Za-z0-9_,] (comma-separated name parts)" >&2; exit 2 ;; esac
# One line (run.sh passes arguments one per line); the report is squeezed onto one line
# between markers so kernel messages on the console cannot split it.
script="./domkit --connect libxl:/// conformance $only_args --record /tmp/libxl.json; rc=\$?; echo; echo DOMKIT-CONF-JSON-BEGIN; tr -d '\\n' < /tmp/libxl.json; echo; echo DOMKIT-CONF-JSON-END; exit \$rc"
# restore_corrupt keeps several copies of a 128 MiB save file, in the process and in dom0's
# tmpfs /tmp at once: with run.sh's default 1536 MiB dom0 the suite was OOM-killed there.
# More dom0 memory, the same 1.5 GiB left to Xen for the domUs.
export DOMKIT_XEN_QEMU_MEM=${DOMKIT_XEN_QEMU_MEM:-4608}
export DOMKIT_XEN_DOM0_MEM=${DOMKIT_XEN_DOM0_MEM:-3072}
set +e
# RUST_LOG (tracing filter of domkit in dom0, e.g. domkit_libxl=info) is passed on when set.
# Scenarios one at a time in dom0 by default (DOMKIT_XEN_CONFORMANCE_JOBS): dom0 has one vCPU
# under TCG, so two at once gained little (46 scenarios in 20 min on a loaded host, about the
# serial pace) and made the promptness checks flaky.
envs=(--env "DOMKIT_CONFORMANCE_JOBS=${DOMKIT_XEN_CONFORMANCE_JOBS:-1}")
[ -n "${RUST_LOG:-}" ] && envs+=(--env "RUST_LOG=$RUST_LOG")
bash xen-host/run.sh --payload "$work/payload" --timeout 3000 --log "$log" "${envs[@]}" -- sh -c "$script"
rc=$?
set -e

json=$(awk '/DOMKIT-CONF-JSON-BEGIN/ {on=1; next} /DOMKIT-CONF-JSON-END/ {on=0} on && /^\{/ {print}' "$log" | tail -n 1)
if [ -z "$json" ]; then
  echo "$me: no conformance report came back (run.sh exit $rc)" >&2
  echo "xen-conformance: 0 passed, 1 failed, 0 skipped"
  exit 1
fi
printf '%s\n' "$json" > "$work/report.json"
python3 - "$work/report.json" "${record:-}" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
doc["command"] = "xen-host/run-conformance.sh (in dom0: " + doc.get("command", "?") + ")"
doc["host"] = "dom0 of Xen 4.17 nested under QEMU TCG; " + doc.get("host", "")
if len(sys.argv) > 2 and sys.argv[2]:
    with open(sys.argv[2], "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
sc = doc["report"]["scenarios"]
count = lambda v: sum(1 for s in sc if s["verdict"] == v)
for s in sc:
    print(f"  {s['name']:<28} {s['verdict']:<12} {s['seconds']:6.1f}s {s['detail']}")
print(f"xen-conformance: {count('pass')} passed, {count('fail')} failed, {count('unsupported')} skipped")
sys.exit(1 if count("fail") else 0)
PY
