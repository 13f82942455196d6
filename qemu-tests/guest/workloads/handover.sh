# Two guests on one running daemon. PHASE=write: mkfs, files and their checksums (kept on the
# disk), unmount. PHASE=verify: a fresh guest mounts the disk, checks the files, unmounts, e2fsck.
# EXPECT_SERIAL, if set: the disk's serial number.
dev=/dev/vda
mnt=/mnt/t
mkdir -p $mnt

if [ -n "$EXPECT_SERIAL" ]; then
    expect_eq serial "$(cat /sys/block/vda/serial)" "$EXPECT_SERIAL"
fi

case "$PHASE" in
write)
    check mkfs mkfs.ext4 -q -F $dev || exit 1
    check mount mount -t ext4 $dev $mnt || exit 1
    check write-files sh -c "
        for i in 1 2 3 4 5 6; do
            dd if=/dev/urandom of=$mnt/file\$i bs=64k count=\$((i * 16)) 2>/dev/null || exit 1
        done
        cd $mnt && sha256sum file* >SHA256SUMS"
    info sums "$(sha256sum $mnt/SHA256SUMS | cut -d' ' -f1)"
    check umount umount $mnt
    ;;
verify)
    check mount mount -t ext4 -o ro $dev $mnt || exit 1
    info sums "$(sha256sum $mnt/SHA256SUMS | cut -d' ' -f1)"
    check verify sh -c "cd $mnt && test -s SHA256SUMS && sha256sum -c SHA256SUMS"
    check umount umount $mnt
    check fsck e2fsck -fn $dev
    ;;
*)
    fail phase "PHASE must be write or verify, not '$PHASE'"
    ;;
esac
