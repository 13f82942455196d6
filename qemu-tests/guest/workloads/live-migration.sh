# A VM live-migrated between two daemons on one shared store: data written on the source (flushed,
# and a last write never flushed by the guest) is read back on the destination, which then writes
# and verifies its own. The host migrates the VM while it waits at `migrate`.
check write-flushed sh -c 'dd if=/dev/urandom of=/tmp/ref1 bs=1M count=16 2>/dev/null &&
    dd if=/tmp/ref1 of=/dev/vda bs=1M oflag=direct conv=fsync 2>/dev/null'
check write-unflushed sh -c 'dd if=/dev/urandom of=/tmp/ref2 bs=1M count=4 2>/dev/null &&
    dd if=/tmp/ref2 of=/dev/vda bs=1M seek=32 oflag=direct 2>/dev/null'
wait_host migrate
check verify-flushed sh -c 'dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | cmp - /tmp/ref1'
check verify-unflushed sh -c 'dd if=/dev/vda bs=1M skip=32 count=4 iflag=direct 2>/dev/null | cmp - /tmp/ref2'
check write-after sh -c 'dd if=/dev/urandom of=/tmp/ref3 bs=1M count=8 2>/dev/null &&
    dd if=/tmp/ref3 of=/dev/vda bs=1M seek=48 oflag=direct conv=fsync 2>/dev/null'
check verify-after sh -c 'dd if=/dev/vda bs=1M skip=48 count=8 iflag=direct 2>/dev/null | cmp - /tmp/ref3'
