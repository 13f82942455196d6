#!/usr/bin/env bash
# A one-host Ceph cluster for tests: one monitor and one OSD on loopback, no authentication, pool
# size 1, the OSD on memstore (objects in RAM). Everything lives in DIR; nothing is installed system
# wide and nothing listens beyond 127.0.0.1.
#
#   scripts/ceph-cluster.sh start DIR [POOL...]   bring a cluster up in DIR (which must not hold one
#                                                 already), create the pools (default: dovetail),
#                                                 wait until an object round-trips; print DIR/ceph.conf
#   scripts/ceph-cluster.sh stop DIR              stop the cluster's daemons by their pid files
#   scripts/ceph-cluster.sh status DIR            say whether its daemons run
#
# Clients use `-c DIR/ceph.conf` (librados: rados_conf_read_file). The monitor's port is chosen per
# run: read it from the config file, never assume 6789. Needs Debian's ceph-mon, ceph-osd and
# ceph-common (scripts/test-deps.sh installs them). Settings: ENV CEPH_MEMSTORE_BYTES (default 4 GiB
# of object space), CEPH_START_TIMEOUT (seconds, default 60).
set -euo pipefail

die() { echo "ceph-cluster.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
shift 2

conf="$dir/ceph.conf"

pids() {
    local f
    for f in "$dir"/run/*.pid; do
        [ -e "$f" ] && cat "$f"
    done
    return 0
}

running() {
    local p
    for p in $(pids); do
        [ -d "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && return 0
    done
    return 1
}

stop() {
    local p
    for p in $(pids); do
        kill "$p" 2>/dev/null || true
    done
    # Up to 2 s for a clean stop, then kill -9: a test run must not leave daemons behind.
    for _ in $(seq 20); do
        running || break
        sleep 0.1
    done
    for p in $(pids); do
        kill -9 "$p" 2>/dev/null || true
    done
    rm -f "$dir"/run/*.pid
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

ceph_() { timeout 30 ceph -c "$conf" --connect-timeout 20 "$@"; }

start() {
    local pools=("$@")
    [ ${#pools[@]} -gt 0 ] || pools=(dovetail)
    for t in ceph-mon ceph-osd ceph monmaptool ceph-authtool rados; do
        command -v "$t" >/dev/null 2>&1 || die "$t not found: install ceph-mon ceph-osd ceph-common"
    done
    [ ! -e "$conf" ] || die "$dir already holds a cluster ($conf); stop it and remove the directory first"
    mkdir -p "$dir"/{run,log,mon,osd}
    dir=$(cd "$dir" && pwd)
    conf="$dir/ceph.conf"

    local fsid port bytes
    fsid=$(cat /proc/sys/kernel/random/uuid)
    port=$(free_port)
    bytes=${CEPH_MEMSTORE_BYTES:-4294967296}
    cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
ms bind msgr1 = false
ms bind msgr2 = true
ms bind retry count = 1
ms bind retry delay = 1
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
client mount timeout = 15
rados osd op timeout = 30
rados mon op timeout = 30
run dir = $dir/run
log file = $dir/log/\$name.log
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
osd objectstore = memstore
memstore device bytes = $bytes
osd max object name len = 256
osd max object namespace len = 64
EOF

    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
        2>>"$dir/log/mkfs.log" || die "ceph-mon --mkfs failed: $dir/log/mkfs.log"
    ceph-mon -c "$conf" -i a 2>>"$dir/log/start.log" || die "ceph-mon did not start: $dir/log/mon.a.log"

    local uuid id
    uuid=$(cat /proc/sys/kernel/random/uuid)
    id=$(ceph_ osd new "$uuid") || die "the monitor did not answer (osd new): $dir/log/mon.a.log"
    mkdir -p "$dir/osd/osd.$id"
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$uuid" 2>>"$dir/log/mkfs.log" >/dev/null ||
        die "ceph-osd --mkfs failed: $dir/log/mkfs.log"
    ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/start.log" || die "ceph-osd did not start: $dir/log/osd.$id.log"

    for p in "${pools[@]}"; do
        ceph_ osd pool create "$p" 8 8 >/dev/null 2>&1 || die "could not create pool $p"
        ceph_ osd pool set "$p" size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
    done

    # Served when an object round-trips through every pool.
    local deadline=$((SECONDS + ${CEPH_START_TIMEOUT:-60}))
    local probe="$dir/probe"
    echo "dovetail ceph-cluster probe" > "$probe"
    for p in "${pools[@]}"; do
        until timeout 10 rados -c "$conf" -p "$p" put probe "$probe" 2>/dev/null &&
            timeout 10 rados -c "$conf" -p "$p" get probe "$probe.back" 2>/dev/null &&
            cmp -s "$probe" "$probe.back"; do
            if [ $SECONDS -ge $deadline ]; then
                stop
                die "pool $p did not serve within ${CEPH_START_TIMEOUT:-60} s (logs in $dir/log)"
            fi
            sleep 0.5
        done
        timeout 10 rados -c "$conf" -p "$p" rm probe 2>/dev/null || true
    done
    rm -f "$probe" "$probe.back"
    echo "$conf"
}

case "$cmd" in
    start) start "$@" ;;
    stop) stop ;;
    status)
        if running; then echo "running ($(pids | tr '\n' ' '))"; else echo "stopped"; exit 1; fi
        ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac
