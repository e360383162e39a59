#!/bin/sh
# /init of a guest's initramfs: load virtio/ext4 modules, mount the disk,
# hand over to the image's own init (/sbin/lab-init, or init= on the cmdline).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "lab-guest-initramfs: insmod $m failed"; done
INIT=/sbin/lab-init
for a in $(cat /proc/cmdline); do case "$a" in init=*) INIT="${a#init=}";; esac; done
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 -o rw /dev/vda /newroot || { echo "LAB-GUEST-FAILED: cannot mount /dev/vda"; sleep 1; poweroff -f; }
umount /proc /sys /dev 2>/dev/null
exec switch_root /newroot "$INIT"
