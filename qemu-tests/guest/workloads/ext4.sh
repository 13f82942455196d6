# ext4 on /dev/vda: mkfs, write files, sync, checksum, unmount, drop caches, remount, verify,
# e2fsck -fn.
dev=/dev/vda
mnt=/mnt/t
mkdir -p $mnt

check mkfs mkfs.ext4 -q -F $dev || exit 1
check mount mount -t ext4 $dev $mnt || exit 1
check write-files sh -c "
    mkdir -p $mnt/dir/sub || exit 1
    for i in 1 2 3 4 5 6 7 8; do
        dd if=/dev/urandom of=$mnt/file\$i bs=64k count=\$((i * 12)) 2>/dev/null || exit 1
    done
    for i in \$(seq 1 200); do
        echo \"small file \$i\" >$mnt/dir/sub/s\$i || exit 1
    done"
check sync sync
check checksum sh -c "cd $mnt && find . -type f | sort | xargs sha256sum >/tmp/sums"
info files "$(wc -l </tmp/sums)"
check umount umount $mnt
echo 3 >/proc/sys/vm/drop_caches
check remount mount -t ext4 $dev $mnt || exit 1
check verify sh -c "cd $mnt && sha256sum -c /tmp/sums"
check umount-again umount $mnt
check fsck e2fsck -fn $dev
