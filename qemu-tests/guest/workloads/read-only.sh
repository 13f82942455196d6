# /dev/vda is served read-only over a host-written pattern: reads must return it (CHECK_SHA of
# CHECK_MB MiB at CHECK_AT MiB), and writes, discards, write-zeroes and mkfs must fail.
dev=/dev/vda

expect_eq ro-flag "$(blockdev --getro $dev)" 1
expect_eq read-pattern "$(sha_of $dev "$CHECK_AT" "$CHECK_MB")" "$CHECK_SHA"
check read-all dd if=$dev of=/dev/null bs=1M iflag=direct

# Linux honours VIRTIO_BLK_F_RO: it refuses these before a request reaches the daemon (EPERM, and
# `blockdev --setrw` cannot lift a read-only flag the device set), so what is checked here is that
# the daemon advertised the flag and that nothing got through.
check_fails write-rejected dd if=/dev/zero of=$dev bs=4k count=1 seek=100 oflag=direct conv=fsync
check_fails discard-rejected blkdiscard -o 0 -l 1048576 $dev
check_fails zeroout-rejected blkdiscard -z -o 1048576 -l 1048576 $dev
check_fails mkfs-rejected mkfs.ext4 -q -F $dev

expect_eq read-pattern-after "$(sha_of $dev "$CHECK_AT" "$CHECK_MB")" "$CHECK_SHA"
