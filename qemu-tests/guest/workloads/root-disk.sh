# Runs from the root filesystem on /dev/vda (the initramfs is gone after switch_root): checks the
# mount, writes /probe.txt for the host to read, writes data with fsync and reads it back from disk.
expect_eq root-device "$(awk '$2 == "/" { print $1 }' /proc/mounts)" /dev/vda
expect_eq root-fstype "$(awk '$2 == "/" { print $3 }' /proc/mounts)" ext4
expect_eq root-rw "$(awk '$2 == "/" { split($4, o, ","); print o[1] }' /proc/mounts)" rw
probe="dovetail-root-ok $(cat /proc/sys/kernel/random/uuid)"
check write-probe sh -c "echo '$probe' >/probe.txt && sync"
info probe "$probe"
check write-data dd if=/dev/urandom of=/data.bin bs=1M count=8 conv=fsync
sum=$(sha256sum /data.bin | cut -d' ' -f1)
echo 3 >/proc/sys/vm/drop_caches
expect_eq reread "$(sha256sum /data.bin | cut -d' ' -f1)" "$sum"
info data-sha256 "$sum"
