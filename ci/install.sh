#!/usr/bin/env bash
# Installs what cutline needs on a Debian bookworm machine, idempotently:
# QEMU >= 10 (bookworm-backports) with qemu-utils (qemu-img, qemu-io, qemu-nbd), the guest kernel (linux-image-cloud-amd64),
# busybox-static, iproute2, zstd, and cargo-nextest if missing.
# With --with-garage, also Garage 2.5 (the tests' replicated object store), built from
# crates.io with cargo install: about 9 minutes on 2 cores, once per machine.
# Safe to run again: it only installs what is missing.
set -euo pipefail

with_garage=false
for arg in "$@"; do
  case "$arg" in
    --with-garage) with_garage=true ;;
    *) echo "ci/install.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo "$@"; else
      echo "ci/install.sh: must run as root (or with sudo) to install packages" >&2; exit 1
    fi
  else "$@"; fi
}

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

have_kernel() { ls /boot/vmlinuz-*cloud-amd64 >/dev/null 2>&1; }

missing=()
[ "$(qemu_major)" -ge 10 ] || missing+=(qemu)
# Restore writes images through qemu-nbd (qemu-utils, with qemu-img and qemu-io).
command -v qemu-nbd >/dev/null 2>&1 && command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
have_kernel || missing+=(kernel)
[ -x /bin/busybox ] && file -L /bin/busybox 2>/dev/null | grep -q static || dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v cpio >/dev/null 2>&1 || missing+=(cpio)

if [ ${#missing[@]} -gt 0 ]; then
  echo "ci/install.sh: installing: ${missing[*]}"
  # bookworm-backports, with the same URI as the existing bookworm entry.
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(grep -rhs '^URIs:.*debian$\|^URIs:.*debian/$' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri=$(grep -hs '^deb .*bookworm ' /etc/apt/sources.list | head -1 | awk '{print $2}')
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" \
      | need_root tee /etc/apt/sources.list.d/cutline-backports.sources >/dev/null
  fi
  export DEBIAN_FRONTEND=noninteractive
  need_root apt-get update -qq
  need_root apt-get install -y -qq --no-install-recommends busybox-static iproute2 cpio zstd kmod file >/dev/null
  need_root apt-get install -y -qq --no-install-recommends linux-image-cloud-amd64 >/dev/null
  need_root apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-utils >/dev/null
fi

if [ "$(qemu_major)" -lt 10 ]; then
  echo "ci/install.sh: QEMU >= 10 is required, found $(qemu-system-x86_64 --version | head -1)" >&2
  exit 1
fi
have_kernel || { echo "ci/install.sh: no /boot/vmlinuz-*cloud-amd64 after install" >&2; exit 1; }

if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
if $with_garage && ! { command -v garage >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/garage" ]; }; then
  echo "ci/install.sh: building Garage 2.5 (cargo install garage, about 9 minutes on 2 cores)"
  cargo install --locked garage --version 2.5.0
fi
echo "ci/install.sh: ready: $(qemu-system-x86_64 --version | head -1); kernel $(ls /boot/vmlinuz-*cloud-amd64 | head -1)"
