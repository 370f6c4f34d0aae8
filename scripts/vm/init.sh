#!/bin/sh
# /init (PID 1) of the ublk-dr test VM. Runs under busybox; scripts/vm.sh copies it
# into the initramfs. Do not run it on a host.
#
# Boot sequence:
#   1. devtmpfs/proc/sys, load the modules listed in /lib/modules/order (insmod, in order)
#   2. host root over 9p (read-only) as the lower layer of an overlay whose upper layer is
#      guest tmpfs: the guest sees every host file and can write anywhere, but writes stay
#      in guest RAM and vanish at poweroff. Fresh tmpfs on /tmp and /run.
#      (If overlay fails: plain read-only root plus tmpfs on /tmp, /run, /var/tmp.)
#   3. the control share (tag ublkctl) at /ctl: init.conf (settings) and cmd.sh (the
#      command, written by vm.sh); the user share (tag ublkshare), writable, at the same
#      path as on the host.
#   4. chroot into the host root and run cmd.sh; print the exit-status marker on the
#      console, write it to /ctl/status too, power off.

PATH=/bin
export PATH

mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

# Guest console: do not turn \n into \r\n (vm.sh passes output through byte for byte).
stty -F /dev/console -onlcr 2>/dev/null

NONCE=
DEBUG=0 # 1: print stage timings (UBLK_DR_VM_DEBUG=1 on the host)
stage() {
    [ "$DEBUG" = 1 ] || return 0
    read -r up _ </proc/uptime
    echo "vm-init: [$up s] $*"
}
fail() {
    echo "vm-init: $*"
    [ -d /ctl ] && echo "vm-init: $*" >>/ctl/error 2>/dev/null
    poweroff -f
    sleep 5
    reboot -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -qw 'ublk_dr_debug=1' /proc/cmdline && DEBUG=1
stage "init started"

while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || echo "vm-init: warning: insmod $m failed"
done </lib/modules/order

mkdir -p /ctl /lower /rw /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ublkctl /ctl ||
    fail "cannot mount the control share (tag ublkctl)"
[ -r /ctl/init.conf ] || fail "/ctl/init.conf missing"
# shellcheck disable=SC1091
. /ctl/init.conf

stage "modules loaded, control share mounted"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,"${ROOT_9P_OPTS:-cache=loose}" hostroot /lower ||
    fail "cannot mount the host root over 9p (tag hostroot)"

overlay=0
if [ "${OVERLAY:-1}" = 1 ] && grep -qw overlay /proc/filesystems; then
    mount -t tmpfs -o mode=0755 rw /rw &&
        mkdir -p /rw/upper /rw/work &&
        mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,xino=off overlay /host &&
        overlay=1
fi
if [ "$overlay" = 0 ]; then
    [ "${OVERLAY:-1}" = 1 ] &&
        echo "vm-init: warning: overlay root not available; the host root is read-only in the guest"
    mount -o bind /lower /host || fail "cannot bind the host root"
fi

mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "cannot mount tmpfs on /tmp"
mount -t tmpfs -o mode=0755 tmpfs /host/run || fail "cannot mount tmpfs on /run"
if [ "$overlay" = 0 ]; then
    mount -t tmpfs -o mode=1777 tmpfs /host/var/tmp 2>/dev/null
fi
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
mount -t configfs configfs /host/sys/kernel/config 2>/dev/null
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
mkdir -p /host/run/lock

# Full module tree of the guest kernel, so `modprobe <module>` works inside the guest.
if [ -n "$MODDIR" ] && [ -d "/host$MODDIR" ]; then
    mkdir -p "/host/lib/modules/$KVER" 2>/dev/null &&
        mount -o bind "/host$MODDIR" "/host/lib/modules/$KVER"
fi

if [ -n "$SHARE" ]; then
    mkdir -p "/host$SHARE" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 ublkshare "/host$SHARE" ||
        fail "cannot mount the shared directory $SHARE (tag ublkshare)"
fi

ip link set lo up 2>/dev/null
hostname ublk-dr-vm 2>/dev/null
[ -n "$ROWS" ] && stty -F /dev/console rows "$ROWS" cols "$COLS" 2>/dev/null

stage "mounts done"
mkdir -p /host/run/ublk-dr-vm
cp /ctl/cmd.sh /host/run/ublk-dr-vm/cmd.sh || fail "cannot copy the command script"
read -r boot_s _ </proc/uptime
echo "$boot_s" >/ctl/boot-seconds

if [ "${TTY:-0}" = 1 ]; then
    chroot /host /bin/bash /run/ublk-dr-vm/cmd.sh </dev/null
    status=$?
else
    # vm.sh's stdout is no terminal: give CMD a pipe too (no progress bars or colours).
    mkfifo /out.fifo
    cat /out.fifo &
    catpid=$!
    chroot /host /bin/bash /run/ublk-dr-vm/cmd.sh </dev/null >/out.fifo 2>&1
    status=$?
    # A daemon CMD left behind may hold the pipe open: do not wait for it for long.
    (sleep 1 && kill "$catpid" 2>/dev/null) &
    wait "$catpid" 2>/dev/null
fi

read -r end_s _ </proc/uptime
echo "$end_s" >/ctl/end-seconds
echo "$status" >/ctl/status
echo "@@UBLK-DR-VM-EXIT $NONCE $status@@"
# Let the serial port drain before the machine goes away.
sleep 0.3
poweroff -f
sleep 5
reboot -f
