#!/usr/bin/env bash
# Install the Debian packages cloudlet needs, then check every program it runs.
#
# One apt transaction always names every package, with the QEMU family pinned
# to one version (the version of qemu-system-x86 apt would install, or the
# one installed): a machine image that ships a newer backported qemu-utils
# (10.0.2 beside Debian 12's QEMU 7.2) gets qemu-utils replaced at the
# system's version instead of silently removed by the qemu-system install.
#
# Skipped (no apt-get) when every package is there and qemu-img and
# qemu-system-x86_64 are one version. Exit status non-zero, with what is
# missing and what to run, when the result cannot run cloudlet.
set -euo pipefail

packages=(qemu-system-x86 qemu-utils linux-image-amd64 busybox-static debootstrap
          e2fsprogs zstd xz-utils iproute2 curl tar binutils util-linux coreutils
          etcd-server protobuf-compiler libprotobuf-dev chromium)
# program  package  (what cloudlet runs, and where it comes from)
programs=(
  "qemu-system-x86_64 qemu-system-x86" "qemu-img qemu-utils" "qemu-io qemu-utils"
  "debootstrap debootstrap" "mkfs.ext4 e2fsprogs" "busybox busybox-static"
  "zstd zstd" "xz xz-utils" "ip iproute2" "tc iproute2" "curl curl" "tar tar"
  "strip binutils" "sha256sum coreutils" "etcd etcd-server" "protoc protobuf-compiler"
  "chromium chromium"
)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# "7.2.19" out of "QEMU emulator version 7.2.19 (Debian ...)" or "qemu-img version 10.0.2 (...)".
qemu_version() { "$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9][0-9.]*\).*/\1/p'; }
same_qemu() {
  local a b
  a=$(qemu_version qemu-system-x86_64) b=$(qemu_version qemu-img)
  [ -n "$a" ] && [ "$a" = "$b" ]
}

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done

if [ ${#missing[@]} -gt 0 ] || ! same_qemu; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages: ${missing[*]:-none}; QEMU versions:" \
         "qemu-system-x86_64 $(qemu_version qemu-system-x86_64 || true)," \
         "qemu-img $(qemu_version qemu-img || true)" >&2
    echo "install-deps: run as root (make deps), or: sudo ./scripts/install-deps.sh" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  echo "install-deps: apt-get update"
  apt-get update -qq
  # The QEMU family on one version: the installed qemu-system-x86's, else
  # the one apt would install.
  qv=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  if ! installed qemu-system-x86; then
    qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
  fi
  if [ -z "$qv" ] || [ "$qv" = "(none)" ]; then
    echo "install-deps: apt has no qemu-system-x86 (is a Debian 12 'main' source in /etc/apt/sources.list.d?)" >&2
    exit 1
  fi
  named=()
  for p in "${packages[@]}"; do
    case "$p" in
      qemu-system-x86|qemu-utils) named+=("$p=$qv") ;;
      *) named+=("$p") ;;
    esac
  done
  echo "install-deps: apt-get install ${named[*]}"
  if ! apt-get install -y -qq --no-install-recommends --allow-downgrades "${named[@]}" \
      >/tmp/cloudlet-install-deps.log 2>&1; then
    tail -20 /tmp/cloudlet-install-deps.log >&2
    echo "install-deps: apt-get install failed (full log: /tmp/cloudlet-install-deps.log)" >&2
    exit 1
  fi
fi

# The API fuzzer the tests run against a live daemon (PyPI, pinned): in the
# python3 the tests call (`python3 -c 'from schemathesis.cli import ...'`).
SCHEMATHESIS=4.32.5
if ! python3 -c "import schemathesis, sys; sys.exit(schemathesis.__version__ != '$SCHEMATHESIS')" 2>/dev/null; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "install-deps: apt-get install python3-pip"
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip; } >/tmp/cloudlet-install-deps.log 2>&1 || true
  fi
  echo "install-deps: pip install schemathesis==$SCHEMATHESIS"
  if ! python3 -m pip install -q --disable-pip-version-check --break-system-packages \
      "schemathesis==$SCHEMATHESIS" >/tmp/cloudlet-install-pip.log 2>&1; then
    tail -20 /tmp/cloudlet-install-pip.log >&2
    echo "install-deps: pip install schemathesis failed (full log: /tmp/cloudlet-install-pip.log)" >&2
    exit 1
  fi
fi

# A confined QEMU (cloudletd's default as root: a uid of its own per VM)
# resumes a synthesized VM early, by postcopy, only where processes without
# privileges may use userfaultfd: QEMU 7.2 asks for one without
# UFFD_USER_MODE_ONLY. Allowed for this host, and kept in /etc/sysctl.d;
# where it cannot be set, VMs are still confined but wait for their whole
# memory (cloudlet doctor says so).
uffd_conf=/etc/sysctl.d/60-cloudlet.conf
if [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || echo 1)" != 1 ]; then
  if [ "$(id -u)" -eq 0 ] && sysctl -q -w vm.unprivileged_userfaultfd=1 2>/dev/null; then
    mkdir -p /etc/sysctl.d
    printf '%s\n' "# cloudlet: confined QEMUs (a uid per VM) take an early start by postcopy" \
      "vm.unprivileged_userfaultfd = 1" >"$uffd_conf"
    echo "install-deps: vm.unprivileged_userfaultfd = 1 (kept in $uffd_conf)"
  else
    echo "install-deps: warning: vm.unprivileged_userfaultfd is 0 and cannot be set here:" \
         "confined QEMUs take no early start (as root: sysctl -w vm.unprivileged_userfaultfd=1)" >&2
  fi
fi

# Every program cloudlet runs, and one QEMU version.
bad=0
for entry in "${programs[@]}"; do
  read -r prog pkg <<<"$entry"
  if ! command -v "$prog" >/dev/null 2>&1; then
    echo "install-deps: missing program '$prog' (package $pkg): run: apt-get install $pkg" >&2
    bad=1
  fi
done
if ! compgen -G "/boot/vmlinuz-*" >/dev/null; then
  echo "install-deps: no guest kernel /boot/vmlinuz-* (package linux-image-amd64): run: apt-get install linux-image-amd64" >&2
  bad=1
fi
if [ $bad -eq 0 ] && ! same_qemu; then
  echo "install-deps: qemu-system-x86_64 is $(qemu_version qemu-system-x86_64), qemu-img is $(qemu_version qemu-img):" \
       "the QEMU family must be one version; run: apt-get install --allow-downgrades" \
       "qemu-system-x86=VERSION qemu-utils=VERSION (as root: ./scripts/install-deps.sh)" >&2
  bad=1
fi
exit $bad
