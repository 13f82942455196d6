# ext4 and fio verify on a disk served through a voting Tee (three members, one of them
# fault-injecting), then two whole-disk reads with the host looking in between.
#
# 1. mkfs.ext4, mount, fio verify (crc32c, random 4 KiB writes then a read-back of every block)
#    on a file of the filesystem, small files, sync, sha256 of every file, unmount, drop caches,
#    remount, verify the sums, unmount.
# 2. Read the whole disk once (O_DIRECT): every block the faulty member got wrong is voted on and
#    repaired; `wait_host first-pass` while the host reads the members' counters.
# 3. Read the whole disk again, remount and verify the sums again, `e2fsck -fn`: the host then
#    checks that no member lost a vote in this second pass (the members agree on every block).
#
# Env: FIO_MB (size of the fio file, default 16).
dev=/dev/vda
mnt=/mnt/t
fio_mb=${FIO_MB:-16}
mkdir -p $mnt

check mkfs mkfs.ext4 -q -F -b 4096 $dev || exit 1
check mount mount -t ext4 $dev $mnt || exit 1
check fio-verify fio --name=vote --filename=$mnt/fio.dat --size=${fio_mb}M --ioengine=libaio \
    --direct=1 --iodepth=16 --rw=randwrite --bs=4k --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --randrepeat=0 --verify_state_save=0 || exit 1
check write-files sh -c "
    mkdir -p $mnt/dir/sub || exit 1
    for i in 1 2 3 4 5 6; do
        dd if=/dev/urandom of=$mnt/file\$i bs=64k count=\$((i * 8)) 2>/dev/null || exit 1
    done
    for i in \$(seq 1 100); do
        echo \"small file \$i\" >$mnt/dir/sub/s\$i || exit 1
    done" || exit 1
check sync sync
check checksum sh -c "cd $mnt && find . -type f | sort | xargs sha256sum >/tmp/sums" || exit 1
info files "$(wc -l </tmp/sums)"
check umount umount $mnt
echo 3 >/proc/sys/vm/drop_caches
check remount mount -t ext4 $dev $mnt || exit 1
check verify sh -c "cd $mnt && sha256sum -c /tmp/sums >/dev/null" || exit 1
check umount-again umount $mnt

check read-disk dd if=$dev of=/dev/null bs=1M iflag=direct
wait_host first-pass || exit 1
check reread-disk dd if=$dev of=/dev/null bs=1M iflag=direct
echo 3 >/proc/sys/vm/drop_caches
check remount-again mount -t ext4 $dev $mnt || exit 1
check verify-again sh -c "cd $mnt && sha256sum -c /tmp/sums >/dev/null" || exit 1
check umount-last umount $mnt
check fsck e2fsck -fn $dev
