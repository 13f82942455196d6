# A disk grown under a running fio verify loop: the guest must see the new size at once (the
# config-change interrupt the host's `ctl resize` makes QEMU raise, no rescan asked for), lose
# no verified write, and write and verify past the old end.
#
# 1. Notes the size (/sys/block/vda/size, 512-byte sectors) and starts fio verify rounds (random
#    4 KiB writes, crc32c, read back and checked) in the first RAND_MB of the disk.
# 2. `wait_host resized`: the host grows the disk meanwhile.
# 3. Waits (up to 10 s) for /sys/block/vda/size to grow: `new-size` reports both sizes.
# 4. Stops the loop after the round running now (`verify-rounds`), then writes and verifies
#    PAST_MB at the old end (`past-old-end`) and the new disk's last MiB (`new-last-mib`).
#
# Env: RAND_MB (8), PAST_MB (16).
dev=/dev/vda
rand_mb=${RAND_MB:-8}
past_mb=${PAST_MB:-16}
old=$(cat /sys/block/vda/size)
info old-sectors "$old"

verify="--filename=$dev --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c
 --verify_fatal=1 --verify_state_save=0 --do_verify=1 --randrepeat=0"
rm -f /tmp/stop /tmp/rounds /tmp/round.failed
verify_loop() {
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        # shellcheck disable=SC2086
        if ! fio --name=round$n $verify --rw=randwrite --bs=4k --offset=0 \
            --size=${rand_mb}M >/tmp/round.out 2>&1; then
            echo "round $n failed" >/tmp/round.failed
            cat /tmp/round.out >>/tmp/round.failed
            return 1
        fi
        echo "$n" >/tmp/rounds
    done
}
verify_loop </dev/null >/dev/null 2>&1 &
loop=$!

wait_host resized || exit 1
t=0
new=$(cat /sys/block/vda/size)
while [ "$new" -le "$old" ] && [ $t -lt 100 ]; do
    sleep 0.1
    t=$((t + 1))
    new=$(cat /sys/block/vda/size)
done
if [ "$new" -gt "$old" ]; then
    ok new-size "$old -> $new sectors after $((t * 100)) ms"
else
    fail new-size "still $old sectors 10 s after the host grew the disk"
fi
info new-sectors "$new"

touch /tmp/stop
wait "$loop"
loop_rc=$?
rounds=$(cat /tmp/rounds 2>/dev/null || echo 0)
if [ "$loop_rc" -ne 0 ] || [ -e /tmp/round.failed ]; then
    grep -i -m 10 -e 'verify' -e 'error' /tmp/round.failed | sed 's/^/  | /'
    fail verify-rounds "$(head -n 1 /tmp/round.failed 2>/dev/null) after $rounds good rounds"
elif [ "$rounds" -lt 1 ]; then
    fail verify-rounds "no round completed"
else
    ok verify-rounds "$rounds"
fi

if [ "$new" -gt "$old" ]; then
    # shellcheck disable=SC2086
    check past-old-end fio --name=past $verify --rw=write --bs=64k \
        --offset=$((old * 512)) --size=${past_mb}M
    # shellcheck disable=SC2086
    check new-last-mib fio --name=last $verify --rw=write --bs=4k \
        --offset=$((new * 512 - 1048576)) --size=1M
fi
