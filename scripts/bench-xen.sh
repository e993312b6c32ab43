#!/usr/bin/env bash
# domkit-libxl vs xl, interleaved, in one dom0 run of the nested Xen test host (issue 6,
# part 5). Builds domkit-xen-bench (--features libxl), boots xen-host/, runs it in dom0,
# and writes docs/bench/xen.json (one key per figure) from its DOMKIT-XEN-BENCH line.
#
# Usage: scripts/bench-xen.sh [--reps N] [--log FILE]
# Needs: scripts/install-deps.sh (base, xen, xen-host lists), ~4 GiB of RAM, ~15 min under TCG.
set -euo pipefail
cd "$(dirname "$0")/.."
reps=5 log=
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --log) log=$2; shift 2 ;;
    *) echo "bench-xen.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bash scripts/install-deps.sh base xen xen-host >&2
tmp=$(mktemp -d /tmp/domkit-xen-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
[ -n "$log" ] || log=$tmp/serial.log

echo "bench-xen.sh: building domkit-xen-bench (release, --features libxl)" >&2
cargo build --release -q -p domkit-examples --features libxl --bin domkit-xen-bench >&2
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
mkdir -p "$tmp/payload"
cp "$target/release/domkit-xen-bench" "$tmp/payload/"
objcopy --strip-debug "$tmp/payload/domkit-xen-bench" 2>/dev/null || true

status=0
bash xen-host/run.sh --payload "$tmp/payload" --timeout 2400 --log "$log" \
  -- ./domkit-xen-bench --reps "$reps" >/dev/null || status=$?
line=$(grep -a '^DOMKIT-XEN-BENCH ' "$log" | tail -n 1 | cut -d' ' -f2- || true)
if [ -z "$line" ]; then
  echo "bench-xen.sh: no result line (run.sh exit $status); see $log" >&2
  grep -a 'domkit-xen-bench' "$log" | tail -n 20 >&2 || true
  exit "${status/#0/1}"
fi
mkdir -p docs/bench
printf '%s\n' "$line" | python3 -c '
import json, sys
r = json.load(sys.stdin)
r["summary"] = {k: v["median"] for k, v in r["figures"].items()}
json.dump(r, open("docs/bench/xen.json", "w"), indent=1)
print(r["markdown"])
'
grep -a 'domkit-xen-bench: .* failed' "$log" >&2 || true
echo "bench-xen.sh: docs/bench/xen.json written (run.sh exit $status)" >&2
