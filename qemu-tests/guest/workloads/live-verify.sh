# fio verify (crc32c) running continuously on /dev/vda while the host reconfigures the disk live
# (tee, policy changes, untee over the control socket). The guest must not notice: every round
# verifies what it wrote, and data written before the changes still verifies after them.
#
# 1. Writes a reference region (REF: 32 MiB at 192 MiB, 64 KiB blocks, crc32c headers) and flushes.
# 2. Starts a loop of fio verify rounds in the background: two rounds of random 4 KiB writes
#    (RAND_MB at offset 0), then one of sequential 1 MiB writes (SEQ_MB at 64 MiB), and so on, each
#    reading back and checking every block (libaio, O_DIRECT, iodepth 16, JOBS jobs).
# 3. `wait_host changes-done`: the host makes its changes while the loop runs.
# 4. Lets the loop run one more full round, started after the host's last change, stops it and
#    reports `verify-rounds N` (fail if a round failed or fewer than MIN_ROUNDS ran), then
#    re-verifies the reference region.
#
# Env: JOBS (default DOVETAIL_QUEUES), RAND_MB (16), SEQ_MB (32), MIN_ROUNDS (3), FIO_EXTRA (more
# fio options for the rounds, e.g. --fsync=4).
#
# With EXT4_MB (0: none), an ext4 file system of that size on a loop device at 224 MiB of the
# disk (past the reference region) takes part too: made (`ext4-mkfs`) and filled with files
# before the loop (`ext4-files`), written to during it (a file of 64 KiB rewritten and fsynced at a time,
# its sha256 noted once fsync returned), and after it checked from the page cache, then
# unmounted, checked with `e2fsck -fn` (`ext4-fsck`) and mounted again to check every file's
# sum from the disk (`ext4-verify`). With RESIZE=1 the guest waits for the host's `resized`
# during the loop and checks /sys/block/vda/size grew within 5 s (`new-size`), without a rescan.
dev=/dev/vda
jobs=${JOBS:-$DOVETAIL_QUEUES}
rand_mb=${RAND_MB:-16}
seq_mb=${SEQ_MB:-32}
min_rounds=${MIN_ROUNDS:-3}

verify="--ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1
 --verify_state_save=0"
common="--filename=$dev $verify --numjobs=$jobs --group_reporting --do_verify=1 --randrepeat=0
 ${FIO_EXTRA:-}"
if [ "$jobs" -gt 1 ]; then
    common="$common --cpus_allowed=0-$(($(nproc) - 1)) --cpus_allowed_policy=split"
fi
ref="--name=ref --filename=$dev $verify --rw=write --bs=64k --offset=192M --size=32M"

check write-ref fio $ref --do_verify=0 --end_fsync=1 || exit 1

ext4_mb=${EXT4_MB:-0}
mnt=/mnt/lv
sums=/tmp/ext4-sums
if [ "$ext4_mb" -gt 0 ]; then
    rm -rf $sums /tmp/ext4-stop /tmp/ext4-written
    mkdir -p $mnt $sums
    fsdev=$(losetup -f) || { fail ext4-files "no free loop device"; exit 1; }
    # The file system's own device: 224 MiB on, EXT4_MB long (sized by mkfs).
    # Few inodes, nothing zeroed ahead (the device is new): a small mkfs under TCG.
    check ext4-mkfs sh -c "
        losetup -o $((224 << 20)) $fsdev $dev || exit 1
        mkfs.ext4 -q -F -N 512 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 \
            $fsdev $((ext4_mb * 1024)) || exit 1
        mount -t ext4 $fsdev $mnt" || exit 1
    check ext4-files sh -c "
        mkdir -p $mnt/before $mnt/during || exit 1
        for i in 1 2 3 4; do
            dd if=/dev/urandom of=$mnt/before/f\$i bs=64k count=\$i 2>/dev/null || exit 1
        done
        for i in \$(seq 1 20); do echo \"small file \$i\" >$mnt/before/s\$i || exit 1; done
        sync || exit 1
        cd $mnt/before && for f in *; do sha256sum \$PWD/\$f >$sums/b-\$f || exit 1; done" ||
        exit 1
    # During the host's changes: file N % 40 rewritten with 64 KiB of new data and fsynced, its
    # sum noted only then (what the guest knows to be on the disk).
    ext4_loop() {
        n=0
        while [ ! -e /tmp/ext4-stop ]; do
            n=$((n + 1))
            f=$mnt/during/w$((n % 40))
            dd if=/dev/urandom of="$f" bs=64k count=1 conv=fsync 2>/dev/null || return 1
            sha256sum "$f" >$sums/d-w$((n % 40)) || return 1
            echo "$n" >/tmp/ext4-written
            sleep 0.2
        done
    }
    ext4_loop </dev/null >/dev/null 2>&1 &
    ext4_pid=$!
fi

rm -f /tmp/stop-after /tmp/started /tmp/rounds /tmp/round.failed /tmp/round.log
# One fio verify round after another until round $(cat /tmp/stop-after) has run. /tmp/started
# holds the number of the round started last, /tmp/rounds the number of rounds that passed; a
# failed round leaves its output in /tmp/round.failed and ends the loop.
verify_loop() {
    n=0
    while :; do
        if [ -e /tmp/stop-after ] && [ "$n" -ge "$(cat /tmp/stop-after)" ]; then
            break
        fi
        n=$((n + 1))
        echo "$n" >/tmp/started
        if [ $((n % 3)) -eq 0 ]; then
            per=$((seq_mb / jobs))
            args="--rw=write --bs=1M --offset=64M --size=${per}M --offset_increment=${per}M"
            kind=seq-1m
        else
            per=$((rand_mb / jobs))
            args="--rw=randwrite --bs=4k --offset=0 --size=${per}M --offset_increment=${per}M"
            kind=rand-4k
        fi
        t0=$(cut -d' ' -f1 /proc/uptime)
        # shellcheck disable=SC2086
        if ! fio --name=round$n $common $args >/tmp/round.out 2>&1; then
            echo "round $n ($kind) failed" >/tmp/round.failed
            cat /tmp/round.out >>/tmp/round.failed
            return 1
        fi
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "$n $kind $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1fs", b - a }')" >>/tmp/round.log
        echo "$n" >/tmp/rounds
    done
}
verify_loop </dev/null >/dev/null 2>&1 &
loop=$!

if [ "${RESIZE:-0}" = 1 ]; then
    old_size=$(cat /sys/block/vda/size)
    wait_host resized || exit 1
    t=0
    new_size=$(cat /sys/block/vda/size)
    while [ "$new_size" -le "$old_size" ] && [ $t -lt 50 ]; do
        sleep 0.1
        t=$((t + 1))
        new_size=$(cat /sys/block/vda/size)
    done
    if [ "$new_size" -gt "$old_size" ]; then
        ok new-size "$old_size -> $new_size sectors after $((t * 100)) ms"
    else
        fail new-size "still $old_size sectors 5 s after the host grew the disk"
    fi
fi

# The loop runs; the host changes the disk meanwhile and then sends `changes-done`.
wait_host changes-done
waited=$?
# The round running now may have started before the last change: stop after the next one, which
# runs wholly after it. (A round counted in /tmp/started but not yet begun begins after this.)
echo $(($(cat /tmp/started) + 1)) >/tmp/stop-after
wait "$loop"
loop_rc=$?
[ "$waited" -eq 0 ] || exit 1

rounds=$(cat /tmp/rounds 2>/dev/null || echo 0)
info round-times "$(awk '{ printf "%s%s:%s", (NR > 1 ? " " : ""), $2, $3 }' /tmp/round.log 2>/dev/null)"
if [ "$loop_rc" -ne 0 ] || [ -e /tmp/round.failed ]; then
    grep -i -m 10 -e 'verify' -e 'error' -e 'failed' /tmp/round.failed | sed 's/^/  | /'
    fail verify-rounds "$(head -n 1 /tmp/round.failed 2>/dev/null || echo "loop exit $loop_rc") after $rounds good rounds"
elif [ "$rounds" -lt "$min_rounds" ]; then
    fail verify-rounds "only $rounds rounds ran, expected at least $min_rounds"
else
    ok verify-rounds "$rounds"
fi

check verify-ref fio $ref --verify_only=1

if [ "$ext4_mb" -gt 0 ]; then
    touch /tmp/ext4-stop
    if wait "$ext4_pid"; then
        ok ext4-during "$(cat /tmp/ext4-written 2>/dev/null || echo 0) fsynced rewrites"
    else
        fail ext4-during "a write or fsync failed after $(cat /tmp/ext4-written 2>/dev/null || echo 0)"
    fi
    check ext4-cached sh -c "cat $sums/* | sha256sum -c -s"
    umount $mnt
    echo 3 >/proc/sys/vm/drop_caches
    check ext4-fsck e2fsck -fn $fsdev
    check ext4-verify sh -c "mount -t ext4 -o ro $fsdev $mnt && cat $sums/* | sha256sum -c -s"
    info ext4-files "$(ls $sums | wc -l)"
    umount $mnt
    losetup -d $fsdev
fi
