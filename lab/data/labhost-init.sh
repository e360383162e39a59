#!/bin/bash
# PID 1 of a nested lab host. Root is this machine's root (read-only 9p under
# a tmpfs overlay), so sshd, libvirtd, qemu, iperf3 and the lab's own Python
# come from the outer machine's packages. The state share
# (/var/lib/vhost-lab/state) is the outer's per-host directory: the lab's SSH
# public key comes in through it, readiness and logs go out through it.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
STATE=/var/lib/vhost-lab/state
exec >/dev/console 2>&1
opt() { for a in $(cat /proc/cmdline); do case "$a" in "$1"=*) echo "${a#*=}";; esac; done; }
say() { echo "lab-host: $*"; }

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm /dev/hugepages
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# /tmp stays the overlay: tools and venvs under this machine's /tmp remain visible.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /run/lock /run/sshd /run/libvirt /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu
[ -e /var/run ] || ln -s /run /var/run

hostname "$(opt lab.hostname)"
ip link set lo up
# Modules the lab needs; tun/tap/vhost/vhost_net come from the kernel
# artifact (stock or patched), which is what /lib/modules is here.
for m in virtio_net kvm_amd kvm_intel tun tap vhost vhost_net sch_netem drop_monitor virtio_rng; do
    modprobe "$m" 2>/dev/null && say "modprobe $m"
done
# No udev here: give the device nodes the modes udev would, or libvirt deems
# KVM unusable for its qemu user and re-probes QEMU on every domain start.
chmod 0666 /dev/kvm /dev/net/tun 2>/dev/null
chmod 0660 /dev/vhost-net 2>/dev/null
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0

# sshd: key-only, the lab's key. Host keys are made fresh per boot (tmpfs).
# The outer root's shell rc files (pyenv init and the like) cost seconds per
# command under TCG; the lab host gets empty ones (in its overlay only).
mkdir -p /root/.ssh && chmod 700 /root/.ssh
for f in .bashrc .profile .bash_profile .bash_login; do [ -e "/root/$f" ] && : > "/root/$f"; done
cp "$STATE/authorized_keys" /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
rm -f /etc/ssh/ssh_host_*
ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
/usr/sbin/sshd -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
    -o PermitRootLogin=prohibit-password -o UseDNS=no -o UsePAM=no -o HostKey=/etc/ssh/ssh_host_ed25519_key \
    -o MaxStartups=50:30:100 -o MaxSessions=50 -E /var/log/sshd.log || say "sshd failed"

# libvirt inside the lab host; the outer's own domain definitions are hidden
# so this libvirtd never sees (or autostarts) them.
for d in /etc/libvirt/qemu /etc/libvirt/qemu/networks /etc/libvirt/storage; do
    [ -d "$d" ] && mount -t tmpfs tmpfs "$d"
done
# libvirtd probes QEMU's capabilities before its first domain: tens of
# seconds under TCG. The result lives on this machine, shared per (kernel
# release, QEMU, libvirt) by every lab and lab host (the "labcaps" share;
# libvirt revalidates it itself), and is warmed up in the background now.
mkdir -p /var/cache/libvirt/qemu/capabilities
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,rw labcaps /var/cache/libvirt/qemu/capabilities ||
    say "no labcaps share: libvirt probes QEMU afresh"
virtlogd -d
libvirtd -d
for i in $(seq 1 100); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.2; done
virsh -q -c qemu:///system domcapabilities --virttype kvm >/dev/null 2>&1 &

{
    echo "release=$(uname -r)"
    echo "kvm=$([ -c /dev/kvm ] && echo yes || echo no)"
    echo "vhost_net=$([ -c /dev/vhost-net ] && echo yes || echo no)"
} > "$STATE/ready.tmp" && mv "$STATE/ready.tmp" "$STATE/ready"
echo "LAB-HOST-READY $(hostname) $(uname -r)"

# PID 1: reap orphans until the outer lab destroys this VM.
trap 'poweroff -f' TERM
while :; do wait; sleep 1; done
