# Daemon restarts under a running guest. The guest writes 32 MiB with fio (crc32c headers) and
# flushes (end_fsync), then sits idle in `wait_host kill` while the host kill -9s and restarts the
# daemon: no request is in flight across the restart. Afterwards new I/O must work and the flushed
# data must verify. Then the same again around `wait_host term`, where the host stops the daemon
# with SIGTERM before starting it again.
dev=/dev/vda
common="--filename=$dev --ioengine=libaio --direct=1 --iodepth=16 --verify=crc32c --verify_fatal=1
 --verify_state_save=0"
before="--name=before $common --rw=write --bs=64k --offset=0 --size=32M"

check write-before fio $before --do_verify=0 --end_fsync=1 || exit 1

wait_host kill || exit 1
check io-after-kill fio --name=after-kill $common --rw=randwrite --bs=4k --offset=64M --size=16M \
    --randrepeat=0 --do_verify=1 --end_fsync=1
check verify-after-kill fio $before --verify_only=1

wait_host term || exit 1
check io-after-term fio --name=after-term $common --rw=randwrite --bs=4k --offset=96M --size=16M \
    --randrepeat=0 --do_verify=1 --end_fsync=1
check verify-after-term fio $before --verify_only=1
