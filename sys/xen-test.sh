#!/usr/bin/env bash
# Run libxenlight-sys' integration tests inside the nested Xen test host
# (xen-host/run.sh), with LIBXENLIGHT_SYS_REQUIRE_XEN=1 so that the tests
# needing a libxl ctx fail instead of skipping.
# Usage: sys/xen-test.sh [extra xen-host/run.sh options...]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
payload=$(mktemp -d "${TMPDIR:-/tmp}/libxenlight-sys-xen.XXXXXX")
trap 'rm -rf "$payload"' EXIT
# Build the test executables and copy them (one per tests/*.rs) to the payload.
cargo test -p libxenlight-sys --tests --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"target":{[^}]*"kind":\["test"\][^}]*"name":"\([a-z_]*\)".*"executable":"\([^"]*\)".*/\1 \2/p' |
  while read -r name exe; do cp "$exe" "$payload/$name"; done
ls "$payload" | grep -q . || { echo "sys/xen-test.sh: no test executables built" >&2; exit 2; }
tests=$(cd "$payload" && ls)
{
  echo '#!/bin/sh'
  echo 'rc=0'
  for t in $tests; do echo "./$t --test-threads=1 || rc=1"; done
  echo 'exit $rc'
} >"$payload/run-all.sh"
chmod +x "$payload/run-all.sh"
xen-host/run.sh --payload "$payload" --env LIBXENLIGHT_SYS_REQUIRE_XEN=1 "$@" -- sh ./run-all.sh
