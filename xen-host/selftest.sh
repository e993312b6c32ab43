#!/usr/bin/env bash
# Self-test of the nested Xen test host: boots it (xen-host/run.sh) with a payload that drives
# a 128 MiB PV domU (from /domu) through xl and xenstore, and a C program linked against
# libxenlight (built here with gcc) that lists the domains.
# Usage: xen-host/selftest.sh [--timeout SECS] [--log FILE]
# Last line: "N passed, M failed". Exit 0 only when everything passed.
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
me=xen-host/selftest.sh
timeout=1200 logfile=
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) [ $# -ge 2 ] || exit 2; timeout=$2; shift 2 ;;
    --log) [ $# -ge 2 ] || exit 2; logfile=$2; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "$me: unknown argument: $1" >&2; exit 2 ;;
  esac
done
for t in gcc; do
  command -v "$t" >/dev/null 2>&1 || { echo "$me: missing host tool '$t' (run scripts/install-deps.sh)" >&2; exit 2; }
done
[ -f /usr/include/libxl.h ] || { echo "$me: missing libxl.h (run scripts/install-deps.sh)" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/domkit-xen-selftest.XXXXXX")
chmod 700 "$tmp"
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
pl=$tmp/payload
mkdir -p "$pl"

# ---- a C program linked against libxenlight: proves the library path works in dom0 ----
cat >"$tmp/libxl-probe.c" <<'EOF'
#include <stdio.h>
#include <stdlib.h>
#include <libxl.h>
#include <xentoollog.h>

int main(int argc, char **argv)
{
    int want = argc > 1 ? atoi(argv[1]) : 1;
    xentoollog_logger_stdiostream *lg =
        xtl_createlogger_stdiostream(stderr, XTL_ERROR, 0);
    libxl_ctx *ctx = NULL;
    int n = 0, i;
    libxl_dominfo *info;

    if (!lg || libxl_ctx_alloc(&ctx, LIBXL_VERSION, 0, (xentoollog_logger *)lg)) {
        fprintf(stderr, "libxl-probe: libxl_ctx_alloc failed\n");
        return 1;
    }
    info = libxl_list_domain(ctx, &n);
    if (!info) {
        fprintf(stderr, "libxl-probe: libxl_list_domain failed\n");
        return 1;
    }
    printf("libxl-probe: %d domain(s):", n);
    for (i = 0; i < n; i++)
        printf(" %u", info[i].domid);
    printf("\n");
    libxl_dominfo_list_free(info, n);
    libxl_ctx_free(ctx);
    xtl_logger_destroy((xentoollog_logger *)lg);
    return n == want ? 0 : 1;
}
EOF
gcc -O1 -Wall -o "$pl/libxl-probe" "$tmp/libxl-probe.c" -lxenlight -lxentoollog

# ---- the dom0 side (busybox sh) ----
cat >"$pl/selftest" <<'EOF'
#!/bin/sh
pass=0 fail=0
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
ok() { pass=$((pass + 1)); echo "SELFTEST ok   $*"; }
bad() { fail=$((fail + 1)); echo "SELFTEST FAIL $*"; }
# wait_for SECS CMD...: retry CMD every 0.2 s
wait_for() {
  n=$(($1 * 5)); shift
  while [ "$n" -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; n=$((n - 1)); done
  return 1
}
gone() { ! xl domid "$1" >/dev/null 2>&1; }
log_of() { echo "/var/log/xen/console/guest-$1.log"; }
nready() { grep -c DOMKIT-DOMU-READY "$(log_of "$1")" 2>/dev/null || echo 0; }
ready_more() { [ "$(nready "$1")" -gt "$2" ]; }
newdomid() { d=$(xl domid "$1" 2>/dev/null) && [ -n "$d" ] && [ "$d" != "$2" ]; }
state() { xl list "$1" 2>/dev/null | awk 'NR == 2 { print $5 }'; }
paused() { state "$1" | grep -q p; }
# A token after the word: the guest acts on each new value once (xen-host/domu/init).
ntoken=0
action() { ntoken=$((ntoken + 1)); xenstore-write "/local/domain/$1/data/domkit-action" "$2 $ntoken"; }

mkcfg() { # name extra-cmdline
  cat > "/tmp/$1.cfg" <<CFG
name = "$1"
type = "pv"
memory = 128
vcpus = 1
kernel = "$DOMKIT_XEN_DOMU_KERNEL"
ramdisk = "$DOMKIT_XEN_DOMU_INITRD"
extra = "console=hvc0 loglevel=4 $2"
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
CFG
}
create() { # name: create and wait for the guest's ready marker
  c0=$(nready "$1"); t=$(now)
  if ! xl create "/tmp/$1.cfg" >/dev/null; then bad "xl create $1"; return 1; fi
  ok "xl create $1 ($(since "$t"))"
  if wait_for 120 ready_more "$1" "$c0"; then ok "$1 prints DOMKIT-DOMU-READY ($(since "$t"))"
  else bad "$1 never printed DOMKIT-DOMU-READY"; cat "$(log_of "$1")"; return 1; fi
}
T0=$(now)

if ./libxl-probe 1; then ok "C program linked against libxenlight runs (1 domain)"
else bad "libxl-probe"; fi

mkcfg st ""
if create st; then
  id=$(xl domid st)
  if ./libxl-probe 2; then ok "libxl-probe sees 2 domains"; else bad "libxl-probe 2"; fi
  if xenstore-ls -p "/local/domain/$id/data" >/dev/null 2>&1 || xenstore-exists "/local/domain/$id/data"; then
    ok "data/ dir exists"; else bad "no /local/domain/$id/data"; fi

  t=$(now); xl pause st && wait_for 10 paused st && ok "xl pause ($(since "$t"))" || bad "xl pause"
  t=$(now); xl unpause st && wait_for 10 sh -c "! xl list st | awk 'NR==2{print \$5}' | grep -q p" &&
    ok "xl unpause ($(since "$t"))" || bad "xl unpause"

  t=$(now)
  if xl save st /tmp/st.save >/tmp/xl.out 2>&1 && gone st; then
    ok "xl save ($(since "$t"), $(($(stat -c %s /tmp/st.save) / 1048576)) MiB)"
  else bad "xl save"; cat /tmp/xl.out; fi
  c0=$(nready st)
  t=$(now)
  if xl restore /tmp/st.save >/tmp/xl.out 2>&1 && xl domid st >/dev/null; then ok "xl restore ($(since "$t"))"
  else bad "xl restore"; cat /tmp/xl.out; fi
  rm -f /tmp/st.save
  id=$(xl domid st 2>/dev/null || echo none)
  [ "$(nready st)" = "$c0" ] && ok "restored guest kept running (no reboot)" || bad "restored guest rebooted"

  # reboot through xenstore: a new domain (new domid) comes back, and does not reboot again
  c0=$(nready st); t=$(now)
  action "$id" reboot
  if wait_for 120 newdomid st "$id" && wait_for 120 ready_more st "$c0"; then
    id2=$(xl domid st)
    ok "xenstore reboot: domid $id -> $id2, guest READY again ($(since "$t"))"
    sleep 3
    [ "$(xl domid st 2>/dev/null)" = "$id2" ] && ok "rebooted guest did not repeat the action" ||
      bad "rebooted guest repeated the action"
    id=$id2
  else bad "xenstore reboot"; fi

  # crash through xenstore (on_crash = destroy)
  t=$(now)
  action "$id" crash
  if wait_for 60 gone st; then ok "xenstore crash: domain destroyed ($(since "$t"))"; else bad "xenstore crash"; xl list; fi
  grep -q "sysrq: Trigger a crash" "$(log_of st)" && ok "the guest crashed itself (sysrq c)" ||
    bad "no sysrq crash in the guest log"
fi

# poweroff through xenstore (on_poweroff = destroy)
if create st; then
  t=$(now)
  action "$(xl domid st)" poweroff
  if wait_for 60 gone st; then ok "xenstore poweroff: domain gone ($(since "$t"))"; else bad "xenstore poweroff"; fi
fi

# PV reboot request (xl reboot -> orderly_reboot -> /sbin/reboot), then PV shutdown request
if create st; then
  id=$(xl domid st); c0=$(nready st); t=$(now)
  if xl reboot st >/dev/null 2>&1 && wait_for 120 newdomid st "$id" && wait_for 120 ready_more st "$c0"; then
    ok "xl reboot: domid $id -> $(xl domid st), guest READY again ($(since "$t"))"
  else bad "xl reboot"; fi
  t=$(now)
  if timeout 60 xl shutdown -w st >/dev/null 2>&1 && gone st; then ok "xl shutdown -w ($(since "$t"))"
  else bad "xl shutdown -w"; fi
  grep -q "shutdown request: powering off" "$(log_of st)" && ok "guest powered itself off on the PV request" ||
    bad "no shutdown message in the guest log"
fi

# a guest that ignores shutdown requests; xl destroy
mkcfg deaf "domkit.ignore_shutdown=1"
if create deaf; then
  xl shutdown deaf >/dev/null 2>&1
  sleep 6
  if xl domid deaf >/dev/null 2>&1; then ok "domkit.ignore_shutdown=1 guest ignores xl shutdown"
  else bad "domkit.ignore_shutdown=1 guest shut down"; fi
  grep -q "ignoring shutdown request" "$(log_of deaf)" && ok "guest logged the ignored request" ||
    bad "no 'ignoring' message in the guest log"
  t=$(now)
  if xl destroy deaf && gone deaf; then ok "xl destroy ($(since "$t"))"; else bad "xl destroy"; fi
fi

if ./libxl-probe 1; then ok "only dom0 left"; else bad "domains left over"; xl list; fi
echo "---- console log of the guest 'deaf' ----"
cat "$(log_of deaf)"
echo "----"
echo "SELFTEST total $(since "$T0")"
echo "selftest: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
EOF
chmod 755 "$pl/selftest"

args=(--payload "$pl" --timeout "$timeout" --log "$tmp/serial.log")
rc=0
"$here/run.sh" "${args[@]}" -- ./selftest || rc=$?
[ -z "$logfile" ] || cp "$tmp/serial.log" "$logfile"
# The dom0 side's own count; the SELFTEST lines are the fallback if it never got there.
if last=$(grep -oE '^selftest: [0-9]+ passed, [0-9]+ failed' "$tmp/serial.log" | tail -n1) && [ -n "$last" ]; then
  pass=$(awk '{ print $2 }' <<<"$last")
  fail=$(awk '{ print $4 }' <<<"$last")
else
  pass=$(grep -c 'SELFTEST ok ' "$tmp/serial.log" || true)
  fail=$(grep -c 'SELFTEST FAIL ' "$tmp/serial.log" || true)
fi
if [ "$rc" -ne 0 ] && [ "$fail" -eq 0 ]; then
  echo "$me: run.sh exited $rc" >&2
  fail=1
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] && [ "$rc" -eq 0 ]
