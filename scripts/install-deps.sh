#!/usr/bin/env bash
# Install the Debian packages domkit needs on a fresh machine (root, Debian 12).
# Usage: scripts/install-deps.sh [base|xen|all ...]   (default: all)
# Package lists live in scripts/deps/*.txt, one package per line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(all)
lists=()
for g in "${groups[@]}"; do
  if [ "$g" = all ]; then lists+=("$here"/deps/*.txt); else lists+=("$here/deps/$g.txt"); fi
done
mapfile -t pkgs < <(cat "${lists[@]}" | sed 's/#.*//' | awk 'NF{print $1}' | sort -u)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
