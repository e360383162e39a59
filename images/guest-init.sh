#!/bin/sh
# /sbin/lab-init: PID 1 of a vhost-lab guest (installed from images/guest-init.sh).
#
# No systemd, no udev, no getty: the serial console is a read-only log and
# the only way in is SSH with the lab's key. The lab's initramfs mounts
# /dev/vda (this image, under a per-guest qcow2 overlay) and execs this file.
#
# Kernel command line (all optional):
#   lab.hostname=NAME        hostname (default "guest")
#   lab.ip=ADDR/PREFIX       address for the interface, e.g. 10.99.1.2/24
#   lab.gw=ADDR              default route via ADDR
#   lab.iface=NAME           interface to configure (default eth0)
#   lab.queues=N             enable N combined channels on it (a multiqueue virtio-net NIC)
#   lab.panic_on_oops=0|1    written to /proc/sys/kernel/panic_on_oops
#
# Console markers (one line each, for the lab to wait on):
#   LAB-GUEST-READY <hostname>            sshd and iperf3 are up, the address is set
#   LAB-GUEST-FAILED <hostname> <reason>  boot cannot complete; the guest stays up
#                                         for its console log to be read
# Other lines start with "lab-init: ".
#
# Stop: SIGTERM, SIGINT (ctrl-alt-del) or SIGPWR to PID 1 syncs and powers off.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022
set -f   # no globbing: the command line is split on blanks only

CONSOLE=/dev/console

say() {
    if [ -c "$CONSOLE" ]; then
        echo "$*" >"$CONSOLE" 2>/dev/null || echo "$*"
    else
        echo "$*"
    fi
}

log() {
    up=
    [ -r /proc/uptime ] && read -r up _ </proc/uptime
    say "lab-init: [${up:-?}] $*"
}

mnt() { # fstype target options
    mountpoint -q "$2" 2>/dev/null && return 0
    [ -d "$2" ] || mkdir -p "$2" 2>/dev/null
    mount -n -t "$1" -o "$3" "$1" "$2" 2>/dev/null || log "warning: cannot mount $1 on $2"
}

HOST=guest
FAILED=

fail() {
    FAILED=1
    log "error: $*"
    say "LAB-GUEST-FAILED $HOST $*"
}

poweroff_now() {
    log "signal received: syncing and powering off"
    kill -TERM -1 2>/dev/null
    sleep 1
    sync
    mount -n -o remount,ro / 2>/dev/null
    if echo o >/proc/sysrq-trigger 2>/dev/null; then
        # The power-off runs asynchronously and takes the disk away first:
        # builtins only from here (no PATH lookups, no reads from /dev/vda).
        while :; do read -r _ <"$CONSOLE"; done
    fi
    # Without sysrq, keep PID 1 alive: dying would panic the kernel.
}

# --- API filesystems ---------------------------------------------------------
mnt proc /proc nosuid,nodev,noexec
mount -n -o remount,rw / 2>/dev/null || log "warning: cannot remount / read-write"
mnt sysfs /sys nosuid,nodev,noexec
mnt devtmpfs /dev mode=0755,nosuid
mnt devpts /dev/pts gid=5,mode=0620,ptmxmode=0666
mnt tmpfs /dev/shm nosuid,nodev,mode=1777
mnt tmpfs /run nosuid,nodev,mode=0755
mnt tmpfs /tmp nosuid,nodev,mode=1777
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx 2>/dev/null
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd 2>/dev/null

trap poweroff_now TERM INT PWR

# --- kernel command line -----------------------------------------------------
IP=
GW=
IFACE=eth0
QUEUES=1
cmdline=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        lab.hostname=*) HOST=${arg#*=} ;;
        lab.ip=*) IP=${arg#*=} ;;
        lab.gw=*) GW=${arg#*=} ;;
        lab.iface=*) IFACE=${arg#*=} ;;
        lab.queues=*) QUEUES=${arg#*=} ;;
        lab.panic_on_oops=0|lab.panic_on_oops=1)
            echo "${arg#*=}" >/proc/sys/kernel/panic_on_oops 2>/dev/null ;;
    esac
done
case "$HOST" in
    '' | -* | *[!A-Za-z0-9.-]*) log "warning: bad lab.hostname, using 'guest'"; HOST=guest ;;
esac

echo "$HOST" >/proc/sys/kernel/hostname 2>/dev/null || log "warning: cannot set hostname"
echo "$HOST" >/etc/hostname 2>/dev/null
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$HOST" >/etc/hosts 2>/dev/null
log "hostname $HOST"

# --- network -----------------------------------------------------------------
ip link set lo up 2>/dev/null || log "warning: cannot bring lo up"
if [ -n "$IP" ]; then
    case "$IP" in
        */*) ;;
        *) IP="$IP/24" ;;
    esac
    n=0
    while [ ! -e "/sys/class/net/$IFACE" ] && [ "$n" -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    if [ ! -e "/sys/class/net/$IFACE" ]; then
        fail "no network interface $IFACE (is virtio_net in the initramfs?)"
    elif ! ip link set dev "$IFACE" up; then
        fail "cannot bring $IFACE up"
    elif ! ip addr add "$IP" dev "$IFACE"; then
        fail "cannot add address $IP to $IFACE"
    elif [ -n "$GW" ] && ! ip route add default via "$GW" dev "$IFACE"; then
        fail "cannot add default route via $GW"
    else
        log "$IFACE $IP${GW:+ via $GW}"
    fi
    # a multiqueue NIC starts with one queue pair in use; the lab asked for N
    case "$QUEUES" in
        1 | '' | *[!0-9]*) ;;
        *) ethtool -L "$IFACE" combined "$QUEUES" && log "$IFACE: $QUEUES combined channels" ||
            log "warning: cannot enable $QUEUES channels on $IFACE" ;;
    esac
else
    log "no lab.ip= on the kernel command line: $IFACE left unconfigured"
fi

# --- services ----------------------------------------------------------------
mkdir -p /run/sshd
chmod 0755 /run/sshd
if [ -z "$FAILED" ]; then
    if /usr/sbin/sshd -E /var/log/sshd.log </dev/null; then
        log "sshd started"
    else
        fail "sshd did not start (see /var/log/sshd.log)"
    fi
fi
if [ -z "$FAILED" ]; then
    if iperf3 -s -D -I /run/iperf3.pid --logfile /var/log/iperf3.log </dev/null; then
        log "iperf3 server started"
    else
        fail "iperf3 server did not start"
    fi
fi

if [ -z "$FAILED" ]; then
    log "ready"
    say "LAB-GUEST-READY $HOST"
fi

# --- PID 1 duty --------------------------------------------------------------
# `wait` reaps every child, including orphans re-parented to PID 1, and it
# returns early for a trapped signal, so the trap runs at once.
while :; do
    sleep 3600 &
    wait $!
done
