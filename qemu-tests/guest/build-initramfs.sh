#!/bin/sh
# Builds the guest side of the VM tests from the host's own packages.
#
#   build-initramfs.sh --flavor FLAVOR --modules DIR --out PATH
#
# FLAVOR:
#   full        busybox, fio, e2fsprogs, util-linux's blkdiscard/fallocate, the virtio and ext4
#               modules, /init and /lib/dovetail.sh; written as a gzip'd newc cpio archive.
#   switchroot  busybox and the modules only; its /init mounts root= from the kernel command line
#               and switch_roots into it; a gzip'd newc cpio archive.
#   rootfs      busybox, /init and /lib/dovetail.sh, no modules; written as a directory (PATH) for
#               `mke2fs -d`. With --with-fio, fio too (on the stub libraries, as in full).
# --modules is the kernel's module directory (lib/modules/RELEASE); not needed for rootfs.
#
# The harness caches the output under a hash of this directory's files, the kernel release and the
# host tools, so edit freely: the next test run rebuilds.
set -eu

flavor=
moddir=
out=
with_fio=
while [ $# -gt 0 ]; do
    case "$1" in
        --flavor) flavor=$2; shift 2 ;;
        --modules) moddir=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --with-fio) with_fio=1; shift ;;
        *) echo "build-initramfs.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$flavor" in full|switchroot|rootfs) ;; *) echo "build-initramfs.sh: --flavor full|switchroot|rootfs" >&2; exit 2 ;; esac
[ -n "$out" ] || { echo "build-initramfs.sh: --out is required" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)

# Load order matters: each module after the ones it needs.
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
crc16 crc32c_generic libcrc32c mbcache jbd2 ext4 loop"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "build-initramfs.sh: $1 not found (run scripts/test-deps.sh)" >&2; exit 1; }
}
need busybox
need cpio
need gzip

if [ "$flavor" = rootfs ]; then
    root=$out
    rm -rf "$root"
    mkdir -p "$root"
else
    root=$(mktemp -d "${TMPDIR:-/tmp}/dovetail-initramfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
fi

mkdir -p "$root"/bin "$root"/sbin "$root"/usr/bin "$root"/usr/sbin "$root"/lib "$root"/lib64 \
    "$root"/etc/dovetail "$root"/proc "$root"/sys "$root"/dev "$root"/tmp "$root"/mnt "$root"/newroot \
    "$root"/var "$root"/root

# busybox must be the static build: it runs before any library is in place.
bb=$(command -v busybox)
if ldd "$bb" >/dev/null 2>&1; then
    echo "build-initramfs.sh: $bb is dynamically linked; install busybox-static" >&2
    exit 1
fi
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done

# Copies a dynamic binary and every library ldd names for it.
copy_binary() {
    src=$(command -v "$1") || { echo "build-initramfs.sh: $1 not found (run scripts/test-deps.sh)" >&2; exit 1; }
    dest=$2
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
    ldd "$src" 2>/dev/null | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# fio as Debian builds it links every optional engine's library (ceph's librbd and librados,
# glusterfs, RDMA, pmem, nbd) and through them about 60 more (ICU, libxml2, gnutls, ...): 80 MiB
# that the guest kernel unpacks at every boot and that each fio start maps and relocates (seconds
# under TCG). The tests use only libaio and psync, so those libraries are replaced by stubs: an
# empty library under the same name, with fio's versions, defining each function fio imports from
# them as abort() (fio is linked with BIND_NOW, so every imported name must exist). An engine
# using them aborts the fio run. Without a C compiler the real libraries are copied.
FIO_KEEP="libc.so.6 libm.so.6 libz.so.1 libaio.so.1 libnuma.so.1"
copy_fio() {
    src=$(command -v fio) || { echo "build-initramfs.sh: fio not found (run scripts/test-deps.sh)" >&2; exit 1; }
    if ! command -v cc >/dev/null 2>&1 || ! command -v nm >/dev/null 2>&1 || ! command -v readelf >/dev/null 2>&1; then
        echo "build-initramfs.sh: no cc/nm/readelf: copying fio with all its libraries" >&2
        copy_binary fio /usr/bin/fio
        return
    fi
    stubs=$(mktemp -d "${TMPDIR:-/tmp}/dovetail-fio-stubs.XXXXXX")
    needed=$(readelf -d "$src" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    stubbed=
    for lib in $needed; do
        case " $FIO_KEEP " in *" $lib "*) ;; *) stubbed="$stubbed $lib" ;; esac
    done
    # Every name the kept libraries define; fio's other imports are the stubbed libraries'.
    for lib in $FIO_KEEP; do
        path=$(ldd "$src" | awk -v l="$lib" '$1 == l { print $3 }')
        [ -n "$path" ] && nm -D --defined-only "$path" | awk '{ print $3 }' | sed 's/@.*//'
    done | sort -u >"$stubs/defined"
    nm -D --undefined-only "$src" | awk '$1 == "U" { print $2 }' | sort -u >"$stubs/imports"
    # stub.map: one version node per version fio asks for (FIO_STUB for unversioned names).
    awk -F@ 'NR == FNR { have[$1] = 1; next }
        !($1 in have) { v = ($2 == "") ? "FIO_STUB" : $2; syms[v] = syms[v] " " $1 ";"; print "void " $1 "(void) { abort(); }" >"'"$stubs"'/stub.c" }
        END { for (v in syms) print v " { global:" syms[v] " };" }' \
        "$stubs/defined" "$stubs/imports" >"$stubs/stub.map"
    sed -i '1i #include <stdlib.h>' "$stubs/stub.c"
    for lib in $stubbed; do
        cc -shared -fPIC -w -o "$stubs/$lib" -Wl,-soname,"$lib" -Wl,--version-script,"$stubs/stub.map" "$stubs/stub.c" || {
            echo "build-initramfs.sh: building the stub for $lib failed" >&2
            exit 1
        }
    done
    # The check: fio starts on the stubs alone.
    LD_LIBRARY_PATH=$stubs "$src" --version >/dev/null || {
        echo "build-initramfs.sh: fio does not start on the stub libraries in $stubs" >&2
        exit 1
    }
    mkdir -p "$root/usr/bin"
    cp -L "$src" "$root/usr/bin/fio"
    for lib in $stubbed; do
        path=$(ldd "$src" | awk -v l="$lib" '$1 == l { print $3 }')
        [ -n "$path" ] || path=/lib/x86_64-linux-gnu/$lib
        mkdir -p "$root$(dirname "$path")"
        cp "$stubs/$lib" "$root$path"
    done
    LD_LIBRARY_PATH=$stubs ldd "$src" 2>/dev/null | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
        case "$lib" in "$stubs"/*) continue ;; esac
        [ -e "$root$lib" ] && continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    rm -rf "$stubs"
}

copy_modules() {
    [ -d "$moddir/kernel" ] || { echo "build-initramfs.sh: --modules $moddir has no kernel/ directory" >&2; exit 1; }
    mkdir -p "$root/lib/modules"
    : >"$root/etc/dovetail/modules"
    for m in $MODULES; do
        # Module file names use either - or _; try both spellings.
        alt=$(echo "$m" | tr _ -)
        f=$(find "$moddir/kernel" \( -name "$m.ko*" -o -name "$alt.ko*" \) | head -n 1)
        [ -n "$f" ] || { echo "build-initramfs.sh: module $m not found under $moddir" >&2; exit 1; }
        case "$f" in
            *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$root/lib/modules/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
            *) echo "build-initramfs.sh: cannot unpack $f" >&2; exit 1 ;;
        esac
        echo "$m" >>"$root/etc/dovetail/modules"
    done
}

case "$flavor" in
    full)
        copy_modules
        copy_fio
        copy_binary mke2fs /usr/sbin/mke2fs
        copy_binary e2fsck /usr/sbin/e2fsck
        copy_binary tune2fs /usr/sbin/tune2fs
        copy_binary dumpe2fs /usr/sbin/dumpe2fs
        copy_binary blkdiscard /usr/sbin/blkdiscard
        copy_binary fallocate /usr/bin/fallocate
        ln -sf mke2fs "$root/usr/sbin/mkfs.ext4"
        ln -sf e2fsck "$root/usr/sbin/fsck.ext4"
        [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
        cp "$here/init" "$root/init"
        cp "$here/dovetail.sh" "$root/lib/dovetail.sh"
        ;;
    switchroot)
        copy_modules
        cp "$here/init-switchroot" "$root/init"
        ;;
    rootfs)
        [ -z "$with_fio" ] || copy_fio
        cp "$here/init" "$root/init"
        cp "$here/dovetail.sh" "$root/lib/dovetail.sh"
        ;;
esac
chmod 755 "$root/init"

if [ "$flavor" != rootfs ]; then
    tmp="$out.tmp.$$"
    (cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -1 >"$tmp"
    mv "$tmp" "$out"
fi
