#!/bin/sh
# /init of the lab host's initramfs: this machine's root over 9p (read-only)
# under a tmpfs overlay, the kernel artifact's modules over 9p, then the lab
# host init from the shared root (lab.init= on the kernel command line).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/console 2>&1
for m in $(cat /modules/order); do insmod "/modules/$m" || echo "lab-initramfs: insmod $m failed"; done
opt() { for a in $(cat /proc/cmdline); do case "$a" in "$1"=*) echo "${a#*=}";; esac; done; }
P9="trans=virtio,version=9p2000.L,msize=512000"
fail() { echo "LAB-HOST-FAILED: $*"; sleep 2; echo o >/proc/sysrq-trigger; poweroff -f; }
mount -t 9p -o "$P9,ro,cache=loose" labroot /lower || fail "mount 9p labroot"
SZ=$(opt lab.overlay_size); mount -t tmpfs -o mode=0755,size=${SZ:-50%} tmpfs /upper || fail "tmpfs"
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || fail "overlay"
mkdir -p /newroot/lib/modules /newroot/var/lib/vhost-lab/state
mount -t 9p -o "$P9,ro,cache=loose" labkernel /newroot/lib/modules || fail "mount 9p labkernel"
mount -t 9p -o "$P9,rw" labstate /newroot/var/lib/vhost-lab/state || fail "mount 9p labstate"
INIT=$(opt lab.init)
umount /proc /sys 2>/dev/null
umount /dev 2>/dev/null
exec switch_root /newroot /bin/bash "$INIT"
