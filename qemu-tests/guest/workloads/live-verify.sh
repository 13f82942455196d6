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
