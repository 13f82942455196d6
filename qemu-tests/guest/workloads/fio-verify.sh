# fio verify (crc32c) on /dev/vda: random 4 KiB writes, then sequential 1 MiB writes, libaio,
# O_DIRECT, iodepth 16; fio reads every block back and checks it. JOBS jobs split each region, so a
# multi-queue disk gets requests from several CPUs (and so several virtqueues) at once.
#
# Env: JOBS (default DOVETAIL_QUEUES), RAND_MB (32), SEQ_MB (64), EXPECT_QUEUES (DOVETAIL_QUEUES),
# MIN_SECS (0): on a fast host the random round is repeated (a fresh verify pass each time) until the
# fio runs have lasted at least this long, for tests that need the host's timers to fire under writes.
dev=/dev/vda
jobs=${JOBS:-$DOVETAIL_QUEUES}
rand_mb=${RAND_MB:-32}
seq_mb=${SEQ_MB:-64}

expect_eq queues "$(ls /sys/block/vda/mq | wc -l)" "${EXPECT_QUEUES:-$DOVETAIL_QUEUES}"
info disk-mib $(($(cat /sys/block/vda/size) / 2048))

common="--filename=$dev --ioengine=libaio --direct=1 --iodepth=16 --numjobs=$jobs --group_reporting
 --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --verify_state_save=0"
if [ "$jobs" -gt 1 ]; then
    # One job per CPU, and Linux maps each CPU to its own virtqueue.
    common="$common --cpus_allowed=0-$(($(nproc) - 1)) --cpus_allowed_policy=split"
fi
# Completions per virtqueue, from each queue's interrupt counter: "NAME COUNT" lines.
queue_irqs() {
    awk '$NF ~ /^virtio[0-9]+-req\.[0-9]+$/ {
        n = 0
        for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
        print $NF, n
    }' /proc/interrupts
}
queue_irqs >/tmp/irqs.before

per=$((rand_mb / jobs))
fio_t0=$(cut -d' ' -f1 /proc/uptime)
check fio-rand-4k fio --name=rand4k $common --rw=randwrite --bs=4k \
    --offset=0 --size=${per}M --offset_increment=${per}M
info fio-rand-4k "$(grep -m1 -o 'write: IOPS=[^,]*' /tmp/check.fio-rand-4k.out)"
round=1
while awk -v t0="$fio_t0" -v u="$(cut -d' ' -f1 /proc/uptime)" -v min="${MIN_SECS:-0}" \
    'BEGIN { exit !(u - t0 < min) }'; do
    round=$((round + 1))
    check fio-rand-4k-round$round fio --name=rand4k $common --rw=randwrite --bs=4k \
        --offset=0 --size=${per}M --offset_increment=${per}M
done
info fio-rand-4k-rounds $round
per=$((seq_mb / jobs))
check fio-seq-1m fio --name=seq1m $common --rw=write --bs=1M \
    --offset=${rand_mb}M --size=${per}M --offset_increment=${per}M
info fio-seq-1m "$(grep -m1 -o 'write: IOPS=[^,]*, BW=[^ ]*' /tmp/check.fio-seq-1m.out)"


# Every virtqueue must have carried requests during the fio runs.
queue_irqs >/tmp/irqs.after
idle=
used=0
while read -r name after; do
    before=$(awk -v q="$name" '$1 == q { print $2 }' /tmp/irqs.before)
    info "completions-$name" $((after - ${before:-0}))
    if [ "$after" -gt "${before:-0}" ]; then used=$((used + 1)); else idle="$idle $name"; fi
done </tmp/irqs.after
if [ -z "$idle" ] && [ "$used" -gt 0 ]; then
    ok all-queues-used "$used"
else
    fail all-queues-used "no completions on:${idle:- any queue}"
fi
