#!/usr/bin/env bash
# Installs the Debian packages bpflb builds and tests with (idempotent; apt runs only when one is missing).
set -euo pipefail
PKGS=(clang llvm libbpf-dev libbpf1 libelf-dev linux-libc-dev iproute2 tcpdump util-linux
      iptables nftables ethtool curl python3-venv python3-dev make gcc)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all Debian packages present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "deps: missing ${missing[*]}; run as root (apt-get install)" >&2
  exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "deps: done"
