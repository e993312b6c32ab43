#!/usr/bin/env bash
# Build the artifacts of domkit's nested Xen test host (Xen 4.17 + Debian dom0 under QEMU TCG).
#
# Usage: xen-host/build.sh [--force]
# Output: ${DOMKIT_XEN_DIR:-$HOME/.cache/domkit/xen}/
#   xen.elf          uncompressed Xen hypervisor (QEMU's multiboot loader needs an ELF)
#   vmlinuz          dom0 kernel (Debian generic amd64: CONFIG_XEN_DOM0=y)
#   dom0/            base dom0 rootfs tree (busybox, Xen toolstack, libs, modules, /init, /domu)
#   dom0-base.cpio   that tree as a newc archive (run.sh appends the payload archive to it)
#   domu/vmlinux     UNCOMPRESSED domU kernel (the ELF inside the bzImage: no per-create decompression)
#   domu/initrd.img  domU busybox initramfs (xen-host/domu/init)
#   stamp            inputs of the last build; nothing is redone while they are unchanged
# Packages are fetched with apt-get download + dpkg-deb -x: nothing is installed on the host.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${DOMKIT_XEN_DIR:-$HOME/.cache/domkit/xen}
force=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "xen-host/build.sh: unknown argument: $a" >&2; exit 2 ;;
  esac
done

trap 'echo "xen-host/build.sh: failed at line $LINENO" >&2' ERR
die() { echo "xen-host/build.sh: $*" >&2; exit 1; }
log() { echo "xen-host/build.sh: $*" >&2; }

for t in apt-get apt-cache dpkg-deb dpkg-query cpio gzip xz zcat ldd objcopy sha256sum od flock find; do
  command -v "$t" >/dev/null 2>&1 || die "missing host tool '$t' (run scripts/install-deps.sh)"
done

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9

# ---- resolve package versions (the kernel through the linux-image-amd64 metapackage) ----
resolve_kernel() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ && !found { print $2; found = 1 }'
}
kpkg=$(resolve_kernel || true)
if [ -z "$kpkg" ] && [ "$(id -u)" -eq 0 ]; then
  log "apt lists look empty: running apt-get update"
  apt-get update -qq >&2 || true
  kpkg=$(resolve_kernel || true)
fi
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64's kernel package (run apt-get update)"
kabi=${kpkg#linux-image-}

pkgs=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils busybox-static "$kpkg")
# ---- guest agent (issue 9): the Xen device model backing PV channels (dom0) ----
# libxl starts /usr/libexec/xen-qemu-system-i386 (Debian's qemu-system-xen) for a PV domain
# with channels: its console backend serves the channel, its chardev the dom0 socket.
pkgs+=(qemu-system-xen)
# qemu-ga for the domU comes from the host (package qemu-guest-agent, as for the QEMU test
# guest of scripts/build-test-guest.sh).
qga_bin=/usr/sbin/qemu-ga
[ -x "$qga_bin" ] || die "missing host $qga_bin (qemu-guest-agent; run scripts/install-deps.sh)"
# ---- end guest agent ----
declare -A ver=()
while read -r p v; do
  ver[$p]=$v
done < <(apt-cache policy "${pkgs[@]}" 2>/dev/null |
  awk '/^[^ \t].*:$/ { sub(/:$/, ""); p = $0 } $1 == "Candidate:" { print p, $2 }')
for p in "${pkgs[@]}"; do
  v=${ver[$p]:-}
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "package $p not available (run apt-get update)"
done

# Host libraries copied into the rootfs come from these host packages.
hostlibs=$(dpkg-query -W -f='${Package} ${Version}\n' 'libxen*' libc6 libgcc-s1 libyajl2 zlib1g \
  liblzma5 libzstd1 libuuid1 libncurses6 libtinfo6 2>/dev/null | sort || true)
grep -q '^libxenmisc4.17 ' <<<"$hostlibs" || die "host lacks libxen-dev 4.17 (run scripts/install-deps.sh)"
hostxen=$(awk '$1 == "libxenmisc4.17" { print $2 }' <<<"$hostlibs")
[ "$hostxen" = "${ver[xen-utils-4.17]}" ] ||
  log "warning: host libxen $hostxen differs from xen-utils-4.17 ${ver[xen-utils-4.17]}"

key=$( {
  echo "format 1"
  for p in "${pkgs[@]}"; do echo "$p ${ver[$p]}"; done
  echo "$hostlibs"
  sha256sum "$here/build.sh" "$here"/domu/* "$here"/dom0-scripts/* | awk '{ print $1 }'
  sha256sum "$qga_bin" | awk '{ print $1 }'   # guest agent (issue 9)
} | sha256sum | awk '{ print $1 }')

outputs=(xen.elf vmlinuz dom0-base.cpio domu/vmlinux domu/initrd.img dom0/init)
if [ "$force" = 0 ] && [ -f "$out/stamp" ] && [ "$(head -n1 "$out/stamp")" = "$key" ]; then
  ok=1
  for f in "${outputs[@]}"; do [ -e "$out/$f" ] || ok=0; done
  if [ "$ok" = 1 ]; then
    log "up to date ($out, kernel $kabi)"
    exit 0
  fi
fi

t0=$(date +%s)
log "building into $out (kernel $kpkg ${ver[$kpkg]}, xen ${ver[xen-hypervisor-4.17-amd64]})"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/domkit-xen-build.XXXXXX")
chmod 700 "$tmp"
trap 'rm -rf "$tmp"' EXIT

# ---- download (cached per package version) and extract ----
mkdir -p "$out/debs"
ex=$tmp/ex
mkdir -p "$ex"
for p in "${pkgs[@]}"; do
  d=$out/debs/$p
  mkdir -p "$d"
  deb=
  for f in "$d"/*.deb; do
    [ -f "$f" ] || continue
    if [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "${ver[$p]}" ]; then deb=$f; else rm -f "$f"; fi
  done
  if [ -z "$deb" ]; then
    log "downloading $p ${ver[$p]}"
    (cd "$d" && apt-get download -q -o APT::Sandbox::User=root "$p=${ver[$p]}" >/dev/null) ||
      die "apt-get download $p failed (network to the Debian mirror? apt-get update?)"
    deb=$(ls "$d"/*.deb | head -n1)
  fi
  dpkg-deb -x "$deb" "$ex"
done

new=$tmp/out
mkdir -p "$new/domu"

# ---- Xen: QEMU's multiboot loader needs the uncompressed ELF ----
xgz=$(ls "$ex"/boot/xen-4.17*-amd64.gz 2>/dev/null | head -n1 || true)
[ -n "$xgz" ] || die "no boot/xen-4.17*-amd64.gz in xen-hypervisor-4.17-amd64"
zcat "$xgz" >"$new/xen.elf"

# ---- kernel ----
bz=$ex/boot/vmlinuz-$kabi
[ -f "$bz" ] || die "no boot/vmlinuz-$kabi in $kpkg"
cp "$bz" "$new/vmlinuz"

# Extract the ELF vmlinux from the bzImage: the boot protocol header gives the compressed
# payload's place (setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c); the payload ends
# with the 4-byte uncompressed size.
u8() { od -A n -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
u32() { od -A n -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
setup_sects=$(u8 "$bz" $((0x1f1)))
[ "$setup_sects" -ne 0 ] || setup_sects=4
poff=$(u32 "$bz" $((0x248)))
plen=$(u32 "$bz" $((0x24c)))
start=$(( (setup_sects + 1) * 512 + poff ))
payload=$tmp/payload
dd if="$bz" of="$payload" bs=64K skip="$start" count="$plen" iflag=skip_bytes,count_bytes status=none
want=$(od -A n -t u4 -j $((plen - 4)) -N 4 "$payload" | tr -d ' ')
magic=$(od -A n -t x1 -N 6 "$payload" | tr -d ' \n')
case "$magic" in
  fd377a585a00*) xz -dc --single-stream <"$payload" >"$new/domu/vmlinux" ;;
  1f8b*) { gzip -dc <"$payload" 2>/dev/null || true; } >"$new/domu/vmlinux" ;;
  28b52ffd*) command -v zstd >/dev/null || die "missing host tool 'zstd' (run scripts/install-deps.sh)"
    { zstd -dc <"$payload" 2>/dev/null || true; } >"$new/domu/vmlinux" ;;
  02214c18*) { lz4 -dc <"$payload" 2>/dev/null || true; } >"$new/domu/vmlinux" ;;
  425a68*) { bzip2 -dc <"$payload" 2>/dev/null || true; } >"$new/domu/vmlinux" ;;
  *) die "unknown kernel payload compression (magic $magic) in $bz" ;;
esac
[ "$(od -A n -t x1 -N 4 "$new/domu/vmlinux" | tr -d ' \n')" = 7f454c46 ] ||
  die "extracted domU vmlinux is not an ELF file"
got=$(stat -c %s "$new/domu/vmlinux")
[ "$got" = "$want" ] || die "extracted domU vmlinux has $got bytes, the bzImage says $want"

# ---- rootfs helpers ----
# Paths are normalised to /usr (the trees are usr-merged: bin, sbin, lib, lib64 are symlinks).
usrpath() {
  local p=${1#/}
  p=${p#usr/}
  echo "usr/$p"
}
mkroot() {
  local r=$1
  mkdir -p "$r"/usr/bin "$r"/usr/sbin "$r"/usr/lib/x86_64-linux-gnu "$r"/usr/lib64 \
    "$r"/proc "$r"/sys "$r"/dev "$r"/tmp "$r"/run "$r"/root "$r"/etc "$r"/var
  ln -s usr/bin "$r/bin"
  ln -s usr/sbin "$r/sbin"
  ln -s usr/lib "$r/lib"
  ln -s usr/lib64 "$r/lib64"
  ln -s ../run "$r/var/run"
  chmod 1777 "$r/tmp"
  cp "$ex/bin/busybox" "$r/usr/bin/busybox"
  local l
  while IFS= read -r l; do
    [ -n "$l" ] && [ "$l" != linuxrc ] || continue
    l=$(usrpath "$l")
    [ -e "$r/$l" ] || ln -s /usr/bin/busybox "$r/$l"
  done < <("$ex/bin/busybox" --list-full)
  printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
  printf 'root:x:0:\n' >"$r/etc/group"
}
# Copy ELF files' shared libraries (as the host's ldd resolves them) into root $1.
addlibs() {
  local r=$1 f line lib
  shift
  for f in "$@"; do
    if ! ldd "$f" >"$tmp/ldd.out" 2>&1; then
      grep -q 'not a dynamic executable' "$tmp/ldd.out" && continue
      die "ldd $f failed: $(head -n1 "$tmp/ldd.out")"
    fi
    if grep -q 'not found' "$tmp/ldd.out"; then
      die "$(basename "$f") needs a library missing on the host: $(grep 'not found' "$tmp/ldd.out" | head -n1 | xargs) (run scripts/install-deps.sh)"
    fi
    while read -r line; do
      case "$line" in
        *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
        /*) lib=${line%% (*} ;;
        *) continue ;;
      esac
      local dst=$r/$(usrpath "$lib")
      [ -e "$dst" ] && continue
      mkdir -p "$(dirname "$dst")"
      cp -L "$lib" "$dst"
    done <"$tmp/ldd.out"
  done
}
addgccs() {
  local r=$1 g
  g=$(ldconfig -p 2>/dev/null | awk '/libgcc_s.so.1 .*x86-64/ && !found { print $NF; found = 1 }')
  [ -n "$g" ] || g=/lib/x86_64-linux-gnu/libgcc_s.so.1
  [ -f "$g" ] || die "host lacks libgcc_s.so.1 (run scripts/install-deps.sh)"
  local dst=$r/$(usrpath "$g")
  mkdir -p "$(dirname "$dst")"
  cp -L "$g" "$dst"
}
mkcpio() { # tree, archive
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) >"$2"
}

# ---- domU rootfs + initramfs ----
du=$tmp/domu-root
mkroot "$du"
cp "$ex/usr/bin/xenstore" "$du/usr/bin/xenstore"
for c in read write rm exists list ls watch chmod; do
  ln -sf xenstore "$du/usr/bin/xenstore-$c"
done
addlibs "$du" "$du/usr/bin/xenstore"
addgccs "$du"
install -m 755 "$here/domu/init" "$du/init"
# The PV disk frontend (a module in Debian's kernel), for guests with disks: domu/init loads it.
mkdir -p "$du/usr/lib/modules"
cp "$ex/lib/modules/$kabi/kernel/drivers/block/xen-blkfront.ko" "$du/usr/lib/modules/"
# ---- domU devices (issue 10): the PV NIC frontend and the device report ----
# xen-netfront (eth0...), loaded by domu/init like xen-blkfront; domkit-devices reports the
# disks and NICs the guest sees on its console (the conformance device scenarios).
cp "$ex/lib/modules/$kabi/kernel/drivers/net/xen-netfront.ko" "$du/usr/lib/modules/"
install -m 755 "$here/domu/domkit-devices" "$du/usr/sbin/domkit-devices"
# ---- end domU devices ----
for s in domkit-poweroff domkit-reboot domkit-ignore; do
  install -m 755 "$here/domu/$s" "$du/usr/sbin/$s"
done
rm -f "$du/usr/sbin/poweroff" "$du/usr/sbin/reboot" "$du/usr/sbin/halt"
ln -s domkit-poweroff "$du/usr/sbin/poweroff"
ln -s domkit-poweroff "$du/usr/sbin/halt"
ln -s domkit-reboot "$du/usr/sbin/reboot"
# ---- guest agent (issue 9): qemu-ga and its helpers in the domU ----
cp "$qga_bin" "$du/usr/sbin/qemu-ga"
addlibs "$du" "$du/usr/sbin/qemu-ga"
for s in agent-ctl shutdown chpasswd; do
  install -m 755 "$here/domu/$s" "$du/usr/sbin/$s"
done
# guest-set-user-password (through /sbin/chpasswd) writes the hash here.
printf 'root:*:19000:0:99999:7:::\n' >"$du/etc/shadow"
chmod 0600 "$du/etc/shadow"
# A loop device and ext4 for the fsfreeze/fstrim scenarios: modules in dependency order
# (from .modinfo, as for dom0 below), loaded by domu/init from modules/agent-order.
declare -A du_modpath=() du_done=()
while IFS= read -r f; do
  n=$(basename "$f" .ko); du_modpath[${n//-/_}]=$f
done < <(find "$ex/lib/modules/$kabi/kernel" -name '*.ko')
du_order=()
du_addmod() {
  local n=${1//-/_} f deps d
  [ -n "${du_done[$n]:-}" ] && return 0
  f=${du_modpath[$n]:-}
  [ -n "$f" ] || return 0   # built in
  objcopy -O binary --only-section=.modinfo "$f" "$tmp/modinfo"
  deps=$(tr '\0' '\n' <"$tmp/modinfo" | sed -n 's/^depends=//p' | tr ',' ' ')
  for d in $deps; do du_addmod "$d"; done
  du_done[$n]=1
  cp "$f" "$du/usr/lib/modules/$n.ko"
  du_order+=("$n")
}
for m in loop crc32c_generic ext4; do du_addmod "$m"; done
printf '%s\n' "${du_order[@]}" >"$du/usr/lib/modules/agent-order"
# ---- end guest agent ----
mkcpio "$du" "$tmp/domu.cpio"
gzip -9n <"$tmp/domu.cpio" >"$new/domu/initrd.img"

# ---- dom0 rootfs ----
d0=$new/dom0
mkroot "$d0"
xb=usr/lib/xen-4.17/bin
mkdir -p "$d0/$xb"
xbins=(xl xenstored xenconsoled xenconsole libxl-save-helper xen-init-dom0 xenstore-control)
for b in "${xbins[@]}"; do
  [ -f "$ex/$xb/$b" ] || die "no $xb/$b in xen-utils-4.17"
  cp -P "$ex/$xb/$b" "$d0/$xb/$b"
  ln -sf "/$xb/$b" "$d0/usr/sbin/$b"
done
cp "$ex/usr/bin/xenstore" "$d0/usr/bin/xenstore"
for c in read write rm exists list ls watch chmod; do
  ln -sf xenstore "$d0/usr/bin/xenstore-$c"
done
addlibs "$d0" "${xbins[@]/#/$ex/$xb/}" "$ex/usr/bin/xenstore"
# ---- guest agent (issue 9): QEMU as the device model of PV channels (dom0) ----
dm=usr/libexec/xen-qemu-system-i386
[ -f "$ex/$dm" ] || die "no /$dm in qemu-system-xen"
mkdir -p "$d0/usr/libexec"
cp "$ex/$dm" "$d0/$dm"
addlibs "$d0" "$d0/$dm"
# libxl passes `-vnc none`, for which QEMU still loads its default keymap (from the host's
# qemu-system-data: the whole package is firmware we do not need).
km=/usr/share/qemu/keymaps/en-us
[ -f "$km" ] || die "missing host $km (qemu-system-data; run scripts/install-deps.sh)"
mkdir -p "$d0/usr/share/qemu/keymaps"
cp "$km" "$d0/$km"
# ---- end guest agent ----
addgccs "$d0"

# kernel modules (and what they depend on, from .modinfo)
mdir=$ex/lib/modules/$kabi/kernel
mkdir -p "$d0/usr/lib/modules"
declare -A modpath=() done_mod=()
while IFS= read -r f; do
  n=$(basename "$f" .ko); modpath[${n//-/_}]=$f
done < <(find "$mdir" -name '*.ko')
modorder=()
addmod() {
  local n=${1//-/_} f deps d
  [ -n "${done_mod[$n]:-}" ] && return 0
  f=${modpath[$n]:-}
  [ -n "$f" ] || die "kernel module $1 not found in $kpkg"
  objcopy -O binary --only-section=.modinfo "$f" "$tmp/modinfo"
  deps=$(tr '\0' '\n' <"$tmp/modinfo" | sed -n 's/^depends=//p' | tr ',' ' ')
  for d in $deps; do addmod "$d"; done
  done_mod[$n]=1
  cp "$f" "$d0/usr/lib/modules/$n.ko"
  modorder+=("$n")
}
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs; do addmod "$m"; done
# Disks of domUs: blkback over loop devices, set up by the vbd hotplug script below.
for m in loop xen-blkback; do addmod "$m"; done
# ---- dom0 networking (issue 10): netback and a bridge for the domUs' vifs ----
for m in bridge xen-netback; do addmod "$m"; done
# ---- end dom0 networking ----
printf '%s\n' "${modorder[@]}" >"$d0/usr/lib/modules/order"

mkdir -p "$d0/etc/xen" "$d0/var/lib/xen" "$d0/var/lib/xenstored" "$d0/var/log/xen/console" \
  "$d0/var/lock" "$d0/payload" "$d0/domu" "$d0/etc/domkit"
: >"$d0/etc/xen/xl.conf"
mkdir -p "$d0/etc/xen/scripts"
install -m 755 "$here/dom0-scripts/block" "$d0/etc/xen/scripts/block"
# ---- dom0 networking (issue 10): vif hotplug script, DHCP on xenbr0 (/init sets it up) ----
install -m 755 "$here/dom0-scripts/vif-bridge" "$d0/etc/xen/scripts/vif-bridge"
cat >"$d0/etc/udhcpd.conf" <<'UDHCPD'
interface xenbr0
start 10.99.0.100
end 10.99.0.250
max_leases 150
lease_file /run/udhcpd.leases
option subnet 255.255.255.0
option lease 600
UDHCPD
# ---- end dom0 networking ----
cp "$new/domu/vmlinux" "$new/domu/initrd.img" "$d0/domu/"

cat >"$d0/init" <<'EOF'
#!/bin/sh
# dom0 init of domkit's nested Xen test host (written by xen-host/build.sh).
export PATH=/usr/sbin:/usr/bin:/usr/lib/xen-4.17/bin
export HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o size=64m tmpfs /dev/shm
mount -t tmpfs -o size=70%,mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/xen /run/xenstored /var/log/xen/console
echo 1 > /proc/sys/kernel/sysrq
fail() {
  echo "DOMKIT-XEN-FAIL $*"
  echo "DOMKIT-XEN-DONE rc=125"
  poweroff -f
  sleep 60
}
while read -r m; do
  insmod "/usr/lib/modules/$m.ko" || fail "insmod $m"
done < /usr/lib/modules/order
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
xenstored --pid-file=/run/xenstored.pid || fail "xenstored"
i=0
while [ ! -S /run/xenstored/socket ]; do
  i=$((i + 1)); [ $i -lt 300 ] || fail "no /run/xenstored/socket"
  sleep 0.1
done
xen-init-dom0 >/dev/null || fail "xen-init-dom0"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console ||
  fail "xenconsoled"
# ---- dom0 networking (issue 10): the bridge xenbr0 of the domUs' vifs, with DHCP ----
# 10.99.0.1/24 on dom0; udhcpd leases 10.99.0.100-250 to the domUs (their device report asks
# for a lease on each NIC: a packet over the bridge both ways). STP off, no forward delay:
# a vif forwards as soon as it is added.
brctl addbr xenbr0 || fail "brctl addbr xenbr0"
brctl stp xenbr0 off
brctl setfd xenbr0 0
ip addr add 10.99.0.1/24 dev xenbr0 || fail "address on xenbr0"
ip link set xenbr0 up || fail "xenbr0 up"
: > /run/udhcpd.leases
udhcpd -S /etc/udhcpd.conf || fail "udhcpd"
# ---- end dom0 networking ----
echo "DOMKIT-XEN-READY uptime=$(cut -d' ' -f1 /proc/uptime)"

# The payload command: one argument per line in /etc/domkit/cmd; NAME=VALUE lines in
# /etc/domkit/env. Both written by run.sh; never evaluated by the shell.
[ -f /etc/domkit/env ] && while IFS= read -r kv; do [ -n "$kv" ] && export "$kv"; done < /etc/domkit/env
export DOMKIT_XEN_DOMU_KERNEL=/domu/vmlinux DOMKIT_XEN_DOMU_INITRD=/domu/initrd.img RUST_BACKTRACE=1
set --
[ -f /etc/domkit/cmd ] && while IFS= read -r a; do set -- "$@" "$a"; done < /etc/domkit/cmd
if [ $# -eq 0 ]; then
  echo "DOMKIT-XEN: no payload command"
  rc=0
else
  cd /payload
  "$@" < /dev/null
  rc=$?
  cd /
fi
sync
echo "DOMKIT-XEN-DONE rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
sleep 60
EOF
chmod 755 "$d0/init"
mkcpio "$d0" "$new/dom0-base.cpio"

# ---- install ----
rm -rf "$out/dom0" "$out/domu" "$out/stamp"
mv "$new/dom0" "$out/dom0"
mv "$new/domu" "$out/domu"
for f in xen.elf vmlinuz dom0-base.cpio; do mv "$new/$f" "$out/$f"; done
{
  echo "$key"
  echo "kernel $kpkg ${ver[$kpkg]}"
  for p in "${pkgs[@]}"; do echo "pkg $p ${ver[$p]}"; done
} >"$out/stamp"
log "done in $(( $(date +%s) - t0 )) s: $out"
