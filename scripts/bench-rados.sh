#!/usr/bin/env bash
# Dovetail on a store on Ceph RADOS against qemu-storage-daemon serving an RBD image of the same
# one-host cluster (QEMU's `driver=rbd`), the same load generator (`dovetail-bench run`) on both
# vhost-user-blk sockets, one run: a 1 MiB sequential fill, then 4 KiB randwrite and randread at
# QD32 and QD1, one queue; beside them Dovetail on a file store (this host's disk, page cache) with
# the same disk. Prints one Markdown table row per cell, with the ratio to qsd + rbd.
#
#   scripts/bench-rados.sh [SECONDS]        seconds per cell (default 6)
#
# Binaries: $DOVETAIL (default target/release/dovetail) and $DOVETAIL_BENCH (default
# target/release/dovetail-bench): `cargo build --release -p dovetail-backend -p dovetail-bench`.
# Needs the test cluster's packages (scripts/test-deps.sh) and qemu-block-extra (QEMU's rbd
# block driver). The cluster (scripts/ceph-cluster.sh: one monitor, one memstore OSD, pool size
# 1) runs on the same cores as both daemons and the load generator: figures of one host, not of
# a Ceph deployment.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-6}
dovetail=${DOVETAIL:-$root/target/release/dovetail}
bench=${DOVETAIL_BENCH:-$root/target/release/dovetail-bench}
qsd=${QSD:-qemu-storage-daemon}
size=256M

die() { echo "bench-rados.sh: $*" >&2; exit 1; }
[ -x "$dovetail" ] || die "no $dovetail (cargo build --release -p dovetail-backend)"
[ -x "$bench" ] || die "no $bench (cargo build --release -p dovetail-bench)"
command -v "$qsd" >/dev/null || die "no qemu-storage-daemon"
ls /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so >/dev/null 2>&1 \
    || die "QEMU's rbd driver is missing (apt-get install qemu-block-extra)"

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-rados.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    "$root/scripts/ceph-cluster.sh" stop "$work/ceph" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

conf=$(CEPH_MEMSTORE_BYTES=$((3 << 30)) "$root/scripts/ceph-cluster.sh" start "$work/ceph" dovetail)
ceph -c "$conf" osd pool application enable dovetail rbd >/dev/null 2>&1 || true

wait_sock() {
    local i
    for i in $(seq 200); do
        [ -S "$1" ] && return 0
        sleep 0.05
    done
    die "$1 never appeared (see $2)"
}

# qemu-storage-daemon over an RBD image.
rbd -c "$conf" create --size "$size" dovetail/qsd
"$qsd" --blockdev "driver=rbd,node-name=r0,pool=dovetail,image=qsd,conf=$conf,user=admin" \
    --export "type=vhost-user-blk,id=e0,addr.type=unix,addr.path=$work/qsd.sock,node-name=r0,writable=on,num-queues=1" \
    >"$work/qsd.log" 2>&1 &
pids+=($!)
wait_sock "$work/qsd.sock" "$work/qsd.log"

# Dovetail on a store on RADOS in the same pool (4 MiB extents, one object each).
"$dovetail" store create rados:dovetail/dt --size 1G --extent-size 4M --ceph-conf "$conf" >/dev/null
"$dovetail" disk create rados:dovetail/dt d --size "$size" --ceph-conf "$conf" >/dev/null
"$dovetail" serve --store rados:dovetail/dt --disk "d=$work/dt.sock" --ceph-conf "$conf" \
    >"$work/dt.log" 2>&1 &
pids+=($!)
wait_sock "$work/dt.sock" "$work/dt.log"

# The file store's figures beside them: the same layout and size on this host's file system.
"$dovetail" store create "$work/fs" --size 1G --extent-size 4M >/dev/null
"$dovetail" disk create "$work/fs" d --size "$size" >/dev/null
"$dovetail" serve --store "$work/fs" --disk "d=$work/fs.sock" >"$work/fs.log" 2>&1 &
pids+=($!)
wait_sock "$work/fs.sock" "$work/fs.log"

# One cell: prints "iops p50 p99" (µs).
cell() {
    local sock=$1 pattern=$2 bs=$3 qd=$4
    shift 4
    "$bench" run --socket "$sock" --pattern "$pattern" --bs "$bs" --iodepth "$qd" \
        --length "$size" --json "$@" \
        | python3 -c 'import json,sys; s=json.load(sys.stdin); l=s["lat_us"]; assert s["io_errors"]==0, s; print("%.0f %.0f %.0f %.1f" % (s["iops"], l["p50"], l["p99"], s["mb_per_s"]))'
}

declare -A res
for sys in qsd dt fs; do
    sock="$work/$sys.sock"
    # Every block written once first: reads then read data, not holes (both would answer
    # unwritten blocks without asking the cluster).
    res[$sys,fill]=$(cell "$sock" write 1M 8 --passes 1)
    res[$sys,rw32]=$(cell "$sock" randwrite 4k 32 --duration "${secs}s")
    res[$sys,rr32]=$(cell "$sock" randread 4k 32 --duration "${secs}s")
    res[$sys,rw1]=$(cell "$sock" randwrite 4k 1 --duration "${secs}s")
    res[$sys,rr1]=$(cell "$sock" randread 4k 1 --duration "${secs}s")
done

row() {
    local name=$1 key=$2 unit=$3
    read -r qi q50 q99 qmb <<<"${res[qsd,$key]}"
    read -r di d50 d99 dmb <<<"${res[dt,$key]}"
    read -r fsi f50 f99 fmb <<<"${res[fs,$key]}"
    if [ "$unit" = MB/s ]; then
        python3 -c "print('| $name | $qmb MB/s | $dmb MB/s | %.2f× | $fmb MB/s |' % ($dmb / $qmb))"
    else
        python3 -c "print('| $name | $qi ($q50 / $q99) | $di ($d50 / $d99) | %.2f× | $fsi ($f50 / $f99) |' % ($di / $qi))"
    fi
}
echo "| cell | qemu-storage-daemon + rbd: IOPS (p50 / p99 µs) | dovetail, rados: store | dovetail / qsd | dovetail, file store |"
echo "| --- | ---: | ---: | ---: | ---: |"
row "1M sequential write, QD8 (the fill)" fill MB/s
row "4K randwrite QD32" rw32 iops
row "4K randread QD32" rr32 iops
row "4K randwrite QD1" rw1 iops
row "4K randread QD1" rr1 iops
