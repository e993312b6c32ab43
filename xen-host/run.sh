#!/usr/bin/env bash
# Boot domkit's nested Xen test host (Xen 4.17 + Debian dom0, QEMU TCG) and run a command in dom0.
#
# Usage: xen-host/run.sh --payload DIR [--timeout SECS] [--boot-timeout SECS] [--log FILE]
#                        [--env NAME=VALUE]... -- CMD ARGS...
#   DIR is copied to /payload in the dom0 initramfs, with the shared libraries its ELF files
#   need (host ldd). dom0's /init starts the toolstack, prints DOMKIT-XEN-READY, runs CMD in
#   /payload with DOMKIT_XEN_DOMU_KERNEL=/domu/vmlinux DOMKIT_XEN_DOMU_INITRD=/domu/initrd.img
#   RUST_BACKTRACE=1, prints "DOMKIT-XEN-DONE rc=N" and powers off.
# The serial console streams to stdout and to the log file.
# Exit: N (CMD's exit code); 124 on timeout (--timeout, default 1800 s, whole run); 125 when
# the host never got READY (--boot-timeout, default 600 s), or dom0/Xen died before DONE.
# Last line: "xen-host: N passed, M failed" (summed cargo test results) when there were any.
# Tunables: DOMKIT_XEN_DIR (artifacts, see build.sh), DOMKIT_XEN_QEMU_MEM (MiB, 3072),
#   DOMKIT_XEN_DOM0_MEM (MiB, 1536), DOMKIT_XEN_SMP (2), DOMKIT_XEN_NO_BUILD=1 (skip build.sh).
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${DOMKIT_XEN_DIR:-$HOME/.cache/domkit/xen}
me=xen-host/run.sh
die() { echo "$me: $*" >&2; exit 2; }
usage() { sed -n '2,17p' "$0" >&2; exit 2; }

payload= timeout=1800 boot_timeout=600 logfile=
envs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --payload) [ $# -ge 2 ] || usage; payload=$2; shift 2 ;;
    --timeout) [ $# -ge 2 ] || usage; timeout=$2; shift 2 ;;
    --boot-timeout) [ $# -ge 2 ] || usage; boot_timeout=$2; shift 2 ;;
    --log) [ $# -ge 2 ] || usage; logfile=$2; shift 2 ;;
    --env) [ $# -ge 2 ] || usage; envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "$me: unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$payload" ] || { echo "$me: --payload DIR is required" >&2; usage; }
[ -d "$payload" ] || die "payload directory not found: $payload"
[ $# -ge 1 ] || { echo "$me: no command after --" >&2; usage; }
[[ $timeout =~ ^[0-9]+$ ]] && [ "$timeout" -gt 0 ] || die "--timeout: seconds expected"
[[ $boot_timeout =~ ^[0-9]+$ ]] && [ "$boot_timeout" -gt 0 ] || die "--boot-timeout: seconds expected"
for a in "$@"; do
  [[ $a != *$'\n'* ]] || die "command arguments must not contain newlines"
done
for kv in "${envs[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*=[^$'\n']*$ ]] || die "--env: NAME=VALUE expected, got: $kv"
done
qmem=${DOMKIT_XEN_QEMU_MEM:-3072}
d0mem=${DOMKIT_XEN_DOM0_MEM:-1536}
smp=${DOMKIT_XEN_SMP:-2}
[[ $qmem =~ ^[0-9]+$ && $d0mem =~ ^[0-9]+$ && $smp =~ ^[0-9]+$ ]] || die "bad DOMKIT_XEN_* number"
[ "$d0mem" -lt "$qmem" ] || die "DOMKIT_XEN_DOM0_MEM must be below DOMKIT_XEN_QEMU_MEM"

for t in qemu-system-x86_64 cpio ldd mkfifo sed tee flock; do
  command -v "$t" >/dev/null 2>&1 || die "missing host tool '$t' (run scripts/install-deps.sh)"
done
if [ "${DOMKIT_XEN_NO_BUILD:-0}" != 1 ]; then
  "$here/build.sh" >&2 || die "build.sh failed"
fi
for f in xen.elf vmlinuz dom0-base.cpio; do
  [ -f "$out/$f" ] || die "missing $out/$f (run xen-host/build.sh)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/domkit-xen-run.XXXXXX")
chmod 700 "$tmp"
[[ $tmp != *[,\ ]* ]] || die "temp dir path must not contain commas or spaces: $tmp"
qpid=
cleanup() {
  local rc=$?
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    kill -TERM "$qpid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$qpid" 2>/dev/null || true
  fi
  wait 2>/dev/null || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ---- payload archive: /payload, its libraries, the command and environment ----
st=$tmp/stage
mkdir -p "$st/payload" "$st/etc/domkit"
chmod 755 "$st" "$st/payload"
cp -a "$payload/." "$st/payload/"
usrpath() { local p=${1#/}; p=${p#usr/}; echo "usr/$p"; }
nlibs=0
addlibs() {
  local f line lib dst
  for f in "$@"; do
    if ! ldd "$f" >"$tmp/ldd.out" 2>&1; then
      grep -q 'not a dynamic executable' "$tmp/ldd.out" && continue
      die "ldd $f failed: $(head -n1 "$tmp/ldd.out")"
    fi
    if grep -q 'not found' "$tmp/ldd.out"; then
      die "${f#"$st/"} needs a library missing on the host: $(grep 'not found' "$tmp/ldd.out" | head -n1 | xargs)"
    fi
    while read -r line; do
      case "$line" in
        *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
        /*) lib=${line%% (*} ;;
        *) continue ;;
      esac
      dst=$st/$(usrpath "$lib")
      [ -e "$dst" ] && continue
      mkdir -p "$(dirname "$dst")"
      cp -L "$lib" "$dst"
      nlibs=$((nlibs + 1))
    done <"$tmp/ldd.out"
  done
}
nelf=0
while IFS= read -r -d '' f; do
  if [ "$(head -c 4 "$f" | od -A n -t x1 | tr -d ' \n')" = 7f454c46 ]; then
    addlibs "$f"
    nelf=$((nelf + 1))
  fi
done < <(find "$st/payload" -type f -print0)
# awk reads all of its input (no early exit): an early exit SIGPIPEs ldconfig, and pipefail
# then kills this script with status 141.
g=$(ldconfig -p 2>/dev/null | awk '/libgcc_s.so.1 .*x86-64/ && !found { print $NF; found = 1 }')
[ -n "$g" ] || g=/lib/x86_64-linux-gnu/libgcc_s.so.1
if [ -f "$g" ] && [ ! -e "$st/$(usrpath "$g")" ]; then
  mkdir -p "$st/$(dirname "$(usrpath "$g")")"
  cp -L "$g" "$st/$(usrpath "$g")"
fi
printf '%s\n' "$@" >"$st/etc/domkit/cmd"
if [ ${#envs[@]} -gt 0 ]; then printf '%s\n' "${envs[@]}" >"$st/etc/domkit/env"; else : >"$st/etc/domkit/env"; fi
chmod 755 "$st/payload"
# The kernel unpacks this archive over the base one: later entries win.
(cd "$st" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) >"$tmp/payload.cpio"
# A shared lock: build.sh (exclusive) does not replace the artifacts while we copy them.
exec 9>>"$out/.lock"
flock -s 9
cat "$out/dom0-base.cpio" "$tmp/payload.cpio" >"$tmp/dom0.cpio"
cp "$out/vmlinuz" "$tmp/vmlinuz"
cp "$out/xen.elf" "$tmp/xen.elf"
flock -u 9
exec 9>&-
echo "$me: payload: $nelf ELF file(s), $nlibs librar(ies); initramfs $(( $(stat -c %s "$tmp/dom0.cpio") / 1048576 )) MiB" >&2

# ---- boot ----
xen_cmd="console=com1 com1=115200,8n1 dom0_mem=${d0mem}M,max:${d0mem}M dom0_max_vcpus=1 noreboot bootscrub=0"
dom0_cmd="console=hvc0 earlyprintk=xen loglevel=4"
serial=$tmp/serial.log
: >"$serial"
if [ -n "$logfile" ]; then : >"$logfile" || die "cannot write --log $logfile"; fi
mkfifo "$tmp/fifo"
# The reader strips the serial CRs and copies to stdout, our scan copy and the log file.
if [ -n "$logfile" ]; then
  sed -u 's/\r*$//' <"$tmp/fifo" | tee -a "$serial" "$logfile" &
else
  sed -u 's/\r*$//' <"$tmp/fifo" | tee -a "$serial" &
fi
# setpriv --pdeathsig: QEMU dies with this script even if the script is SIGKILLed.
pdeath=()
if command -v setpriv >/dev/null 2>&1 && setpriv --help 2>&1 | grep -q -- --pdeathsig; then
  pdeath=(setpriv --pdeathsig KILL --)
fi
t0=$(date +%s)
"${pdeath[@]}" qemu-system-x86_64 -accel tcg -cpu qemu64 -m "$qmem" -smp "$smp" \
  -display none -monitor none -nodefaults -no-reboot -serial stdio \
  -kernel "$tmp/xen.elf" -append "$xen_cmd" \
  -initrd "$tmp/vmlinuz $dom0_cmd,$tmp/dom0.cpio" \
  </dev/null >"$tmp/fifo" 2>&1 &
qpid=$!

result=
ready=0 ready_s= hwm=0
while :; do
  now=$(date +%s)
  el=$((now - t0))
  if [ "$ready" = 0 ] && grep -q '^DOMKIT-XEN-READY' "$serial"; then
    ready=1 ready_s=$el
  fi
  if grep -qE '^DOMKIT-XEN-DONE rc=[0-9]+' "$serial"; then
    result=$(grep -oE '^DOMKIT-XEN-DONE rc=[0-9]+' "$serial" | head -n1 | sed 's/.*rc=//')
    break
  fi
  if ! kill -0 "$qpid" 2>/dev/null; then
    break
  fi
  h=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$qpid/status" 2>/dev/null || true)
  [ -z "$h" ] || hwm=$h
  if grep -qE 'Hardware Dom0 crashed|Kernel panic - not syncing|Panic on CPU' "$serial"; then
    sleep 2
    echo "$me: dom0 or Xen crashed (see the serial log above)" >&2
    break
  fi
  if [ "$ready" = 0 ] && [ "$el" -ge "$boot_timeout" ]; then
    echo "$me: DOMKIT-XEN-READY did not appear within ${boot_timeout}s; killing QEMU" >&2
    break
  fi
  if [ "$el" -ge "$timeout" ]; then
    echo "$me: TIMEOUT: no DOMKIT-XEN-DONE within ${timeout}s; killing QEMU" >&2
    result=124
    break
  fi
  sleep 1
done
if [ -n "$result" ] && [ "$result" != 124 ]; then
  # dom0 powers off after DONE; give QEMU a moment to exit by itself.
  for _ in $(seq 1 60); do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
fi
if kill -0 "$qpid" 2>/dev/null; then
  kill -TERM "$qpid" 2>/dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$qpid" 2>/dev/null || true
fi
wait "$qpid" 2>/dev/null || true
qpid=
wait 2>/dev/null || true
total=$(( $(date +%s) - t0 ))

if [ -z "$result" ]; then
  if [ "$ready" = 0 ]; then
    echo "$me: FAILED: the Xen host never reached DOMKIT-XEN-READY (${total}s)" >&2
  else
    echo "$me: FAILED: dom0 stopped before DOMKIT-XEN-DONE (${total}s)" >&2
  fi
  result=125
fi
rs=never
[ -z "$ready_s" ] || rs=${ready_s}s
echo "xen-host: exit $result, boot to READY $rs, total ${total}s, qemu peak RSS $((hwm / 1024)) MiB"
if grep -qE 'test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$serial"; then
  grep -oE 'test result: [A-Za-z]+\. [0-9]+ passed; [0-9]+ failed' "$serial" |
    awk '{ p += $4; f += $6 } END { printf "xen-host: %d passed, %d failed\n", p, f }'
fi
exit "$result"
