#!/usr/bin/env bash
# Build domkit's small REAL test guest (Linux bzImage + busybox/qemu-ga initramfs) from
# Debian packages, without installing the kernel on the host.
#
# Usage: scripts/build-test-guest.sh [--out DIR] [--refresh] [--force]
#   --out DIR   output dir (default: ${DOMKIT_GUEST_DIR:-$HOME/.cache/domkit/guest})
#   --refresh   re-resolve the kernel through apt (linux-image-cloud-amd64) even on a cache hit;
#               rebuilds only if the resolved kernel changed. Same as DOMKIT_GUEST_REFRESH=1.
#   --force     rebuild unconditionally.
#
# Outputs in DIR: vmlinuz (bzImage), initrd.img (gzip newc cpio), manifest.txt, .stamp.
# Cache: the stamp hashes this script, scripts/guest/*, the kernel package+version and the
# host binaries copied in (busybox, qemu-ga and its libraries). On a hit the script prints DIR
# and exits without calling apt (apt-cache alone takes ~1 s here), so the kernel recorded in
# the stamp is trusted until --refresh. The last line of stdout is always DIR.
#
# Guest kernel cmdline options (read by scripts/guest/init):
#   console=ttyS0               serial console; DOMKIT-GUEST-READY is printed there
#   domkit.ignore_shutdown=1    no acpid and a no-op /sbin/shutdown: the guest ignores
#                               system_powerdown and the agent's guest-shutdown
#   domkit.debug=1              trace the init script on the console
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
guest_src="$here/guest"
meta_pkg=linux-image-cloud-amd64
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         virtio_console virtio_blk button evdev pvpanic pvpanic-mmio pvpanic-pci
         failover net_failover virtio_net scsi_common scsi_mod cdrom sr_mod libata ata_piix
         loop crc16 mbcache jbd2 crc32c_generic libcrc32c ext4)

out="${DOMKIT_GUEST_DIR:-$HOME/.cache/domkit/guest}"
refresh="${DOMKIT_GUEST_REFRESH:-0}"
force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "build-test-guest: --out needs a directory" >&2; exit 2; }
           out="$2"; shift 2 ;;
    --out=*) out="${1#--out=}"; shift ;;
    --refresh) refresh=1; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,21p' "$self" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-test-guest: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$refresh" = 1 ] || refresh=0
mkdir -p "$out"
out=$(cd "$out" && pwd)

die() { echo "build-test-guest: $*" >&2; exit 1; }

# ---- host tools --------------------------------------------------------------------------
busybox_bin=/bin/busybox
qga_bin=/usr/sbin/qemu-ga
need_deps() { die "missing host tool: $1; run scripts/install-deps.sh"; }
for t in apt-get apt-cache dpkg-deb cpio gzip sha256sum ldd flock find sort; do
  command -v "$t" >/dev/null 2>&1 || need_deps "$t"
done
[ -x "$busybox_bin" ] || need_deps "$busybox_bin (busybox-static)"
# The guest userland must be the static busybox (package busybox-static, not busybox).
if ldd "$busybox_bin" >/dev/null 2>&1; then need_deps "static $busybox_bin (busybox-static)"; fi
[ -x "$qga_bin" ] || need_deps "$qga_bin (qemu-guest-agent)"

# qemu-ga's shared libraries, dynamic loader included (absolute paths from ldd).
qga_libs() {
  ldd "$qga_bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u
}

# Stamp: hash of this script, the guest files, the kernel (package + version) and the host
# binaries copied into the initramfs.
compute_stamp() { # $1 = kernel "pkg version"
  {
    echo "kernel $1"
    sha256sum <"$self"  # content only: the checkout's location must not matter
    (cd "$guest_src" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
    (cd "$guest_src" && find . -print0 | sort -z | xargs -0 stat -c '%n %a')
    sha256sum "$busybox_bin" "$qga_bin"
    qga_libs | xargs -r sha256sum
  } | sha256sum | cut -d' ' -f1
}

stamp_file="$out/.stamp"
stamp_kernel() { sed -n 's/^kernel=//p' "$stamp_file" 2>/dev/null | sed -n 1p; }
stamp_hash() { sed -n 's/^hash=//p' "$stamp_file" 2>/dev/null | sed -n 1p; }
outputs_present() { [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/manifest.txt" ]; }
cache_hit() { # $1 = kernel "pkg version"
  [ "$force" = 0 ] && outputs_present && [ -n "$1" ] && [ "$(stamp_kernel)" = "$1" ] &&
    [ "$(stamp_hash)" = "$(compute_stamp "$1")" ]
}

# Fast path: no apt, no lock.
if [ "$refresh" = 0 ] && cache_hit "$(stamp_kernel)"; then
  echo "$out"
  exit 0
fi

# ---- slow path: serialise concurrent builds into the same dir ----------------------------
exec 9>"$out/.lock"
flock 9

resolve_kernel() {
  local dep
  dep=$(apt-cache show --no-all-versions "$meta_pkg" 2>/dev/null | sed -n 's/^Depends: //p' | sed -n 1p)
  [ -n "$dep" ] || die "cannot resolve $meta_pkg with apt-cache (apt-get update needed?)"
  # e.g. "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)"; take the linux-image-* alternative.
  echo "$dep" | tr ',|' '\n\n' | sed 's/^ *//' |
    awk '$1 ~ /^linux-image-[0-9]/ && !found { v = $3; sub(/\)$/, "", v); print $1, v; found = 1 }'
}
kernel=$(resolve_kernel)
[ -n "$kernel" ] || die "no linux-image-* dependency in $meta_pkg"
kpkg=${kernel% *}
kver=${kernel#* }

# Another process may have finished the same build while we waited for the lock.
if cache_hit "$kernel"; then
  echo "$out"
  exit 0
fi

echo "build-test-guest: building guest with $kpkg $kver into $out" >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/domkit-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"   # apt's _apt sandbox user must be able to write the download

(cd "$work" && apt-get download -q "$kpkg=$kver" >"$work/apt.log" 2>&1) ||
  { cat "$work/apt.log" >&2; die "apt-get download $kpkg=$kver failed"; }
deb=$(ls "$work"/"$kpkg"_*.deb 2>/dev/null | sed -n 1p)
[ -n "$deb" ] || die "apt-get download produced no $kpkg .deb"
dpkg-deb -x "$deb" "$work/kernel"
kimg=$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | sed -n 1p)
[ -n "$kimg" ] || die "no /boot/vmlinuz-* in $kpkg"
krel=${kimg##*/vmlinuz-}
moddir="$work/kernel/lib/modules/$krel"
[ -d "$moddir" ] || moddir="$work/kernel/usr/lib/modules/$krel"

# ---- initramfs tree ------------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,etc,proc,sys,dev,run,tmp,var/log,root}
ln -s ../run "$root/var/run"
cp "$busybox_bin" "$root/bin/busybox"
"$busybox_bin" --list-full | while read -r applet; do
  [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done

for m in "${modules[@]}"; do
  f=$(find "$moddir" -name "$m.ko*" -print -quit)
  [ -n "$f" ] || continue   # built in (or gone): init skips it
  case "$f" in
    *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *) die "unsupported module format: $f" ;;
  esac
done

cp "$qga_bin" "$root/usr/sbin/qemu-ga"
while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done < <(qga_libs)

cp -a "$guest_src/." "$root/"
chmod 0755 "$root/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
# guest-set-user-password (through /sbin/chpasswd) writes the hash here.
printf 'root:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
chmod 0600 "$root/etc/shadow"

(cd "$root" && find . -print0 | LC_ALL=C sort -z |
  cpio --null -o -H newc -R 0:0 --quiet) | gzip -9n >"$work/initrd.img"
cp "$kimg" "$work/vmlinuz"

qga_version=$("$qga_bin" --version 2>/dev/null | sed -n 1p)
bb_version=$("$busybox_bin" 2>/dev/null | sed -n 1p | cut -d' ' -f1,2)
{
  echo "kernel_package=$kpkg"
  echo "kernel_version=$kver"
  echo "kernel_release=$krel"
  echo "kernel_metapackage=$meta_pkg"
  echo "qemu_ga=$qga_version"
  echo "busybox=$bb_version"
  echo "build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$work/manifest.txt"

# Install: outputs first (atomic renames), stamp last.
rm -f "$stamp_file"
for f in vmlinuz initrd.img manifest.txt; do
  cp "$work/$f" "$out/.$f.new"
  mv -f "$out/.$f.new" "$out/$f"
done
printf 'kernel=%s\nhash=%s\n' "$kernel" "$(compute_stamp "$kernel")" >"$out/.stamp.new"
mv -f "$out/.stamp.new" "$stamp_file"
echo "build-test-guest: done ($(du -h "$out/vmlinuz" | cut -f1) kernel, $(du -h "$out/initrd.img" | cut -f1) initrd)" >&2
echo "$out"
