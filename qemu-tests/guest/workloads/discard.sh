# Discard and write-zeroes on /dev/vda, whose content the host filled with a pattern. Each request
# kind gets its own REGION_MB-sized region (offsets in MiB from the host); every region must read
# back as zeroes, and the KEEP_AT region must still hold the pattern (KEEP_SHA).
dev=/dev/vda
mib=1048576
len=$((REGION_MB * mib))

discard_max=$(cat /sys/block/vda/queue/discard_max_bytes)
zeroes_max=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
info discard-max-bytes "$discard_max"
info write-zeroes-max-bytes "$zeroes_max"
[ "$discard_max" -gt 0 ] && ok discard-advertised || fail discard-advertised "discard_max_bytes is 0"
[ "$zeroes_max" -gt 0 ] && ok write-zeroes-advertised || fail write-zeroes-advertised "write_zeroes_max_bytes is 0"

for at in $DISCARD_AT $ZEROOUT_AT $PUNCH_AT $ZERORANGE_AT; do
    [ "$(nonzero_bytes $dev "$at" "$REGION_MB")" -gt 0 ] || fail pattern-before "region at ${at}M is already zero"
done

check blkdiscard blkdiscard -o $((DISCARD_AT * mib)) -l $len $dev
check blkdiscard-zeroout blkdiscard -z -o $((ZEROOUT_AT * mib)) -l $len $dev
check punch-hole fallocate --punch-hole -o $((PUNCH_AT * mib)) -l $len $dev
check zero-range fallocate --zero-range --keep-size -o $((ZERORANGE_AT * mib)) -l $len $dev

expect_eq zero-after-discard "$(nonzero_bytes $dev "$DISCARD_AT" "$REGION_MB")" 0
expect_eq zero-after-zeroout "$(nonzero_bytes $dev "$ZEROOUT_AT" "$REGION_MB")" 0
expect_eq zero-after-punch-hole "$(nonzero_bytes $dev "$PUNCH_AT" "$REGION_MB")" 0
expect_eq zero-after-zero-range "$(nonzero_bytes $dev "$ZERORANGE_AT" "$REGION_MB")" 0
expect_eq pattern-kept "$(sha_of $dev "$KEEP_AT" "$REGION_MB")" "$KEEP_SHA"
