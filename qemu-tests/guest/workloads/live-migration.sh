# A VM live-migrated between two daemons on one shared store: data written on the source (flushed,
# and a last write never flushed by the guest) is read back on the destination, which then writes
# and verifies its own. The host migrates the VM while it waits at `migrate`.
check write-flushed sh -c 'dd if=/dev/urandom of=/tmp/ref1 bs=1M count=16 2>/dev/null &&
    dd if=/tmp/ref1 of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null'
check write-unflushed sh -c 'dd if=/dev/urandom of=/tmp/ref2 bs=1M count=4 2>/dev/null &&
    dd if=/tmp/ref2 of=/dev/vda bs=1M seek=32 oflag=direct 2>/dev/null'
# Reads running across the migration: each lands in guest memory by the daemon's hand (O_DIRECT
# into the reader's buffers, and buffered into page-cache pages dropped each round), so only the
# daemon's dirty log gets the destination the data; a copy compared after the switch.
cat /tmp/ref1 /tmp/ref2 > /tmp/ref12
(
    n=0
    while [ ! -e /tmp/stop ]; do
        dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null > /tmp/rd1
        dd if=/dev/vda bs=1M skip=32 count=4 iflag=direct 2>/dev/null >> /tmp/rd1
        cmp -s /tmp/rd1 /tmp/ref12 || echo "round $n" >> /tmp/bad
        # Buffered too: the daemon fills page-cache pages (kernel memory), dropped each round.
        echo 1 > /proc/sys/vm/drop_caches
        dd if=/dev/vda bs=1M skip=32 count=4 2>/dev/null | cmp -s - /tmp/ref2 ||
            echo "buffered round $n" >> /tmp/bad
        n=$((n + 1))
        echo $n > /tmp/rounds
    done
) &
reader=$!
# A second reader keeps O_DIRECT reads in flight at every moment, the migration's start and end
# included (the device's used ring busy while QEMU reconfigures the rings); its data is not
# compared, the first reader's is.
(
    while [ ! -e /tmp/stop ]; do
        dd if=/dev/vda of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null
    done
) &
busy=$!
wait_host migrate
touch /tmp/stop
wait $reader
wait $busy
info read-rounds "$(cat /tmp/rounds)"
check reads-across sh -c '[ ! -e /tmp/bad ] || { cat /tmp/bad; false; }'
check verify-flushed sh -c 'dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | cmp - /tmp/ref1'
check verify-unflushed sh -c 'dd if=/dev/vda bs=1M skip=32 count=4 iflag=direct 2>/dev/null | cmp - /tmp/ref2'
check write-after sh -c 'dd if=/dev/urandom of=/tmp/ref3 bs=1M count=8 2>/dev/null &&
    dd if=/tmp/ref3 of=/dev/vda bs=1M seek=48 oflag=direct conv=fsync 2>/dev/null'
check verify-after sh -c 'dd if=/dev/vda bs=1M skip=48 count=8 iflag=direct 2>/dev/null | cmp - /tmp/ref3'
