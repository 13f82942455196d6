# ext4 on /dev/vda, snapshotted live by the host while the filesystem is frozen.
#
# 1. mkfs, mount, write files, sync, and print each file's sha256 as `DOVETAIL-INFO: sum-NAME SUM`.
# 2. `fsfreeze --freeze` (ext4 flushes its journal and marks itself clean), then
#    `wait_host snapshot-taken` while the host takes the snapshot, then `fsfreeze --unfreeze`.
# 3. The live disk diverges: new files after1..after3, file1 overwritten, file2 deleted; then a
#    background writer keeps rewriting a churn file (and syncing) while the guest waits in
#    `wait_host exported` and the host exports the snapshot.
# 4. Stops the writer, checks the live filesystem's files (the untouched ones still match their
#    sums, the changes are there), unmounts and runs `e2fsck -fn` on the live disk.
dev=/dev/vda
mnt=/mnt/t
mkdir -p $mnt

check mkfs mkfs.ext4 -q -F $dev || exit 1
check mount mount -t ext4 $dev $mnt || exit 1
check write-files sh -c "
    mkdir -p $mnt/dir/sub || exit 1
    for i in 1 2 3 4 5 6; do
        dd if=/dev/urandom of=$mnt/file\$i bs=64k count=\$((i * 8)) 2>/dev/null || exit 1
    done
    for i in \$(seq 1 100); do
        echo \"small file \$i\" >$mnt/dir/sub/s\$i || exit 1
    done" || exit 1
check sync sync
check checksum sh -c "cd $mnt && sha256sum file1 file2 file3 file4 file5 file6 dir/sub/s50 >/tmp/sums" || exit 1
while read -r sum name; do
    info "sum-$(echo "$name" | tr / _)" "$sum"
done </tmp/sums

check freeze fsfreeze --freeze $mnt || exit 1
wait_host snapshot-taken
waited=$?
check thaw fsfreeze --unfreeze $mnt
[ "$waited" -eq 0 ] || exit 1

check write-after sh -c "
    for i in 1 2 3; do
        dd if=/dev/urandom of=$mnt/after\$i bs=64k count=16 2>/dev/null || exit 1
    done
    dd if=/dev/urandom of=$mnt/file1 bs=64k count=8 conv=notrunc 2>/dev/null || exit 1
    rm $mnt/file2 || exit 1
    sync" || exit 1

# Keep the live disk busy while the host exports the snapshot.
rm -f /tmp/stop
churn() {
    n=0
    while [ ! -e /tmp/stop ]; do
        n=$((n + 1))
        dd if=/dev/urandom of=$mnt/churn bs=64k count=32 2>/dev/null || return 1
        sync || return 1
        echo "$n" >/tmp/churns
    done
}
churn </dev/null >/dev/null 2>&1 &
writer=$!
wait_host exported
waited=$?
: >/tmp/stop
wait "$writer"
churn_rc=$?
[ "$waited" -eq 0 ] || exit 1
if [ "$churn_rc" -eq 0 ]; then
    ok churn "$(cat /tmp/churns 2>/dev/null || echo 0) rewrites"
else
    fail churn "the background writer failed (exit $churn_rc)"
fi

check verify-live sh -c "
    cd $mnt || exit 1
    grep -v -e ' file1\$' -e ' file2\$' /tmp/sums | sha256sum -c || exit 1
    # file1 was overwritten and file2 deleted after the snapshot.
    grep ' file1\$' /tmp/sums | sha256sum -c >/dev/null 2>&1 && { echo 'file1 unchanged'; exit 1; }
    [ ! -e file2 ] || { echo 'file2 still there'; exit 1; }
    [ -s after1 ] && [ -s after2 ] && [ -s after3 ]" || exit 1
check umount umount $mnt
check fsck e2fsck -fn $dev
