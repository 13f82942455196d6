#!/bin/sh
# Installs what the VM tests (qemu-tests/) need on Debian 12: QEMU (with qemu-storage-daemon), the
# packages the guest userland is built from, systemd's tools (systemd-socket-activate and
# systemd-analyze, for backend/tests/systemd.rs), and current apt lists (the tests fetch the guest kernel
# with `apt-get download`). Installs only what is missing; safe to run again. Non-interactive; uses
# sudo when not run as root.
set -eu

# xz-utils: the VM tests unpack the guest kernel with it for a direct boot (qemu-tests/src/vmlinux.rs).
# libvirt (qemu-tests/tests/libvirt.rs; virt-xml-validate needs xmllint), tmux (ctl top in a
# terminal, backend/tests/operator_kit.rs) and a one-host Ceph (scripts/ceph-cluster.sh: ceph-mon,
# ceph-osd, the ceph CLI; librados-dev links the rados crate). qemu-block-extra: QEMU's rbd block
# driver, for the qemu-storage-daemon + RBD peer of scripts/bench-rados.sh (a 0.3 MB package).
packages="qemu-system-x86 qemu-system-common busybox-static fio e2fsprogs cpio util-linux gzip xz-utils coreutils
libvirt-daemon-system libvirt-clients libxml2-utils tmux systemd ceph-mon ceph-osd ceph-common librados-dev
qemu-block-extra"

if [ "$(id -u)" -eq 0 ]; then
    as_root() { env DEBIAN_FRONTEND=noninteractive "$@"; }
elif command -v sudo >/dev/null 2>&1; then
    as_root() { sudo env DEBIAN_FRONTEND=noninteractive "$@"; }
else
    echo "test-deps.sh: not root and no sudo; install as root: $packages" >&2
    exit 1
fi

command -v apt-get >/dev/null 2>&1 || {
    echo "test-deps.sh: apt-get not found; the VM tests expect Debian 12 (or a derivative)" >&2
    exit 1
}

missing=
for p in $packages; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done

# The guest kernel comes from apt at test time, so the lists must know linux-image-amd64 even when
# every package is already installed.
kernel_known() {
    apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'
}

if [ -n "$missing" ] || ! kernel_known; then
    echo "test-deps.sh: apt-get update"
    as_root apt-get update -qq
fi

if [ -n "$missing" ]; then
    echo "test-deps.sh: installing$missing"
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    as_root apt-get install -y -qq --no-install-recommends $missing
fi

kernel_known || {
    echo "test-deps.sh: apt still names no package for linux-image-amd64" >&2
    exit 1
}
for tool in qemu-system-x86_64 qemu-storage-daemon busybox fio mke2fs e2fsck debugfs cpio blkdiscard fallocate \
    libvirtd virtlogd virsh virt-xml-validate xmllint tmux ceph-mon ceph-osd ceph rados; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || {
        echo "test-deps.sh: $tool is still missing after the install" >&2
        exit 1
    }
done
echo "test-deps.sh: VM test dependencies present"
