#!/usr/bin/env bash
# scripts/vm.sh: run a command under a Linux kernel that has ublk, in a qemu guest
# that sees the host's whole file system. Run `scripts/vm.sh --help` for usage.
set -euo pipefail
shopt -s inherit_errexit

usage() {
    cat <<'EOF'
Usage:
  scripts/vm.sh setup [--update]
  scripts/vm.sh run [OPTIONS] -- CMD [ARGS...]
  scripts/vm.sh info
  scripts/vm.sh --help

Runs CMD under a Debian 6.12+ kernel with ublk_drv, booted with qemu, for hosts whose
own kernel has no ublk. The guest sees the host's root file system (read through 9p,
with guest-RAM overlay on top: writes work but vanish at poweroff; /tmp and /run are
fresh tmpfs), so build on the host and run the built binaries in the guest.

setup     Install missing host packages (qemu-system-x86 busybox-static cpio xz-utils
          fio e2fsprogs dmsetup kmod; on bookworm, qemu from bookworm-backports), download
          the newest linux-image-6.12+-amd64-unsigned package that apt offers, extract it
          into the cache and build the initramfs.
          Does nothing slow when everything is cached. Needs root the first time.
          --update   also run apt-get update and switch to a newer kernel if there is one
                     (and try again for a newer qemu if an earlier setup kept the old).

run       Boot the guest (running setup first if needed) and run CMD there in the
          caller's working directory, with the caller's PATH (plus the sbin dirs) and
          these variables: RUST_LOG, RUST_BACKTRACE, RUST_LIB_BACKTRACE, RUST_TEST_THREADS,
          RUST_MIN_STACK, HOME, USER, LOGNAME, LANG, LC_ALL, TERM, CARGO_HOME, RUSTUP_HOME,
          RUSTUP_TOOLCHAIN, CARGO_TARGET_DIR and every UBLK_DR_*. In the guest,
          UBLK_DR_IN_VM=1, UBLK_DR_VM_SHARE=<the shared directory> and
          DM_DISABLE_UDEV=1 (there is no udev: dmsetup makes /dev/mapper nodes itself).
          `modprobe NAME` loads any other module of the guest kernel.
          CMD's stdout and stderr both stream to vm.sh's stdout (serial console); CMD's
          stdin is /dev/null. vm.sh exits with CMD's exit status.
  --mem MiB      guest memory (default 4096)
  --cpus N       guest vCPUs (default 2)
  --timeout SEC  kill the guest after SEC seconds, 0 = never (default 3600)
  --share DIR    host directory shown writable at the same path in the guest, e.g. for
                 result files (default: a fresh temp dir, removed afterwards if empty)
  --env NAME[=VALUE]  pass one more variable (repeatable)
  -v, --verbose  print boot time and run time on stderr at the end

info      Print the cached kernel and paths.

Exit status of `run`: CMD's status; 124 if the guest timed out; 137 if qemu was killed
from outside (kill -9) first; 125 if the harness or the guest failed before CMD
reported a status (kernel panic, init failure, bad usage).

If the host kernel itself has /dev/ublk-control (or inside the guest, UBLK_DR_IN_VM=1),
`run` runs CMD natively; set UBLK_DR_FORCE_VM=1 to boot the guest anyway.

Environment:
  UBLK_DR_VM_CACHE       cache directory (default /var/cache/ublk-dr/vm)
  UBLK_DR_VM_KVM=1       use KVM (-accel kvm -cpu host) instead of TCG
  UBLK_DR_VM_ICOUNT=N    TCG with -icount shift=N,sleep=off: guest time counts
                         instructions (2^N ns each), so timings in the guest do not
                         move with the host's load; vCPUs take turns on one host thread
  UBLK_DR_VM_CPU         TCG CPU model (default max,-erms,-fsrm: TCG runs `rep movsb`
                         a byte at a time, so the guest is told not to rely on it)
  UBLK_DR_VM_QEMU_BACKPORTS=0  keep Debian bookworm's qemu 7.2; by default setup
                         installs qemu from bookworm-backports, whose TCG runs the
                         guest's AES-NI on the host's (AES-GCM in the guest 4x faster)
  UBLK_DR_VM_KERNEL_PKG  use this kernel package instead of the newest one
  UBLK_DR_VM_APPEND      extra kernel command line arguments
  UBLK_DR_VM_TIMEOUT     default for --timeout
  UBLK_DR_VM_DEBUG=1     full kernel log and the guest init's stage timings
  UBLK_DR_VM_OVERLAY=0   no RAM overlay: the host root stays read-only in the guest
                         (tmpfs on /tmp, /run, /var/tmp only)
  UBLK_DR_VM_ROOT_9P_OPTS  9p mount options for the host root (default cache=loose:
                         host changes made while the guest runs may not be seen)
  UBLK_DR_FORCE_VM=1     use the guest even if the host kernel has ublk

Examples:
  scripts/vm.sh run -- sh -c 'ls -l /dev/ublk-control'
  cargo build --release && scripts/vm.sh run --share "$PWD/target/vm-out" -- \
      target/release/some-test --out "$PWD/target/vm-out/result.json"
EOF
}

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
INIT_TEMPLATE=$SCRIPT_DIR/vm/init.sh
CACHE=${UBLK_DR_VM_CACHE:-/var/cache/ublk-dr/vm}
HOST_PKGS=(qemu-system-x86 busybox-static cpio xz-utils fio e2fsprogs xfsprogs dmsetup kmod)
# Modules loaded by the guest's init; their dependencies are added automatically
# (netfs, 9pnet, crc16, mbcache, jbd2, ...). Anything else: `modprobe NAME` in the guest.
BOOT_MODULES=(9pnet_virtio 9p overlay ublk_drv loop dm-mod dm-log-writes ext4)
INITRAMFS_FORMAT=1 # bump when the initramfs layout changes
QEMU="qemu-system-x86_64"
MARKER=@@UBLK-DR-VM-EXIT
PASS_ENV=(RUST_LOG RUST_BACKTRACE RUST_LIB_BACKTRACE RUST_TEST_THREADS RUST_MIN_STACK
    HOME USER LOGNAME LANG LC_ALL TERM CARGO_HOME RUSTUP_HOME RUSTUP_TOOLCHAIN
    CARGO_TARGET_DIR)

msg() { printf 'vm.sh: %s\n' "$*" >&2; }
die() {
    printf 'vm.sh: error: %s\n' "$*" >&2
    exit 125
}

# ---------------------------------------------------------------------------- setup

APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    msg "running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed; check the apt sources and the network"
    APT_UPDATED=1
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root: run 'sudo scripts/vm.sh setup' once"
}

pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}

ensure_packages() {
    local p missing=()
    for p in "${HOST_PKGS[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    need_root "installing ${missing[*]}"
    apt_update_once
    msg "installing ${missing[*]}"
    local log
    log=$(mktemp)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get install ${missing[*]} failed (output above)"
    fi
    rm -f "$log"
}

# qemu's version as MAJOR.MINOR.
qemu_version() {
    "$QEMU" --version 2>/dev/null | sed -nE '1s/^QEMU emulator version ([0-9]+\.[0-9]+).*/\1/p'
}

# Before 8.1, TCG emulates the guest's AES-NI in plain C; from 8.1 it uses the host's
# AES instructions. AES-256-GCM in the guest (what the shipper and ublk-target spend
# most of their CPU on) ran 4x faster on 10.0 than on 7.2 here.
qemu_has_fast_aes() {
    local v
    v=$(qemu_version)
    [ -n "$v" ] && awk -v v="$v" 'BEGIN { split(v, p, "."); exit !(p[1] > 8 || (p[1] == 8 && p[2] >= 1)) }'
}

# Marker: the qemu at hand stays (no newer one to be had, or UBLK_DR_VM_QEMU_BACKPORTS=0).
QEMU_KEEP_MARKER=.qemu-kept

# On Debian bookworm (qemu 7.2), installs qemu from bookworm-backports (10.0), adding
# that suite to apt's sources if it is missing; backports never replace other packages
# unless asked for by name. Anything that fails leaves the old qemu in place.
ensure_fast_qemu() {
    qemu_has_fast_aes && return 0
    [ -e "$CACHE/$QEMU_KEEP_MARKER" ] && return 0
    local codename
    codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
    if [ "${UBLK_DR_VM_QEMU_BACKPORTS:-1}" = 0 ] || [ "$codename" != bookworm ]; then
        msg "keeping qemu $(qemu_version): guest AES runs about 4x slower than on qemu 8.1+"
        touch "$CACHE/$QEMU_KEEP_MARKER"
        return 0
    fi
    if [ "$(id -u)" != 0 ]; then
        msg "keeping qemu $(qemu_version): 'sudo scripts/vm.sh setup --update' installs a faster one"
        touch "$CACHE/$QEMU_KEEP_MARKER"
        return 0
    fi
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        msg "adding bookworm-backports to apt's sources (/etc/apt/sources.list.d/ublk-dr-backports.list)"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' \
            >/etc/apt/sources.list.d/ublk-dr-backports.list
    fi
    msg "installing qemu-system-x86 from bookworm-backports (qemu $(qemu_version) emulates AES-NI slowly)"
    local log
    log=$(mktemp)
    if apt-get update -qq >"$log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -t bookworm-backports qemu-system-x86 >>"$log" 2>&1 && qemu_has_fast_aes; then
        msg "qemu $(qemu_version) installed"
    else
        tail -n 20 "$log" >&2
        msg "warning: could not install a newer qemu (output above); keeping qemu $(qemu_version)"
        touch "$CACHE/$QEMU_KEEP_MARKER"
    fi
    rm -f "$log"
}

# Newest amd64 unsigned kernel image of version 6.12 or later that has a candidate.
newest_kernel_pkg() {
    local kver pkg
    apt-cache pkgnames linux-image- 2>/dev/null |
        sed -nE 's/^linux-image-([0-9]+\.[0-9]+\.[0-9]+(\+deb[0-9]+)?-amd64)-unsigned$/\1/p' |
        awk -F. '$1 > 6 || ($1 == 6 && $2 >= 12)' | sort -V -r |
        while read -r kver; do
            pkg=linux-image-$kver-unsigned
            # (no grep -q in a pipe here: with pipefail, its early exit fails the pipe)
            if [[ $(apt-cache policy "$pkg" 2>/dev/null) == *"Candidate: "[0-9]* ]]; then
                echo "$pkg"
                break
            fi
        done || true
}

current_kver() {
    [ -r "$CACHE/current" ] && cat "$CACHE/current"
}

kernel_dir() { echo "$CACHE/kernel-$1"; }

kernel_complete() {
    local kdir
    kdir=$(kernel_dir "$1")
    [ -f "$kdir/.complete" ] && [ -f "$kdir/vmlinuz" ]
}

initramfs_stamp() {
    {
        echo "format $INITRAMFS_FORMAT"
        echo "modules ${BOOT_MODULES[*]}"
        echo "kver $1"
        stat -L -c 'busybox %s %Y' /bin/busybox 2>/dev/null || echo "busybox missing"
        cat "$INIT_TEMPLATE"
    } | sha256sum | cut -d' ' -f1
}

initramfs_current() {
    local kdir
    kdir=$(kernel_dir "$1")
    [ -f "$kdir/initramfs.cpio" ] && [ -f "$kdir/initramfs.stamp" ] &&
        [ "$(cat "$kdir/initramfs.stamp")" = "$(initramfs_stamp "$1")" ]
}

fetch_kernel() {
    local pkg=$1 kver kdir tmp deb moddir
    kver=${pkg#linux-image-}
    kver=${kver%-unsigned}
    kdir=$(kernel_dir "$kver")
    need_root "downloading $pkg"
    msg "downloading $pkg"
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    chmod 755 "$tmp"
    chown _apt "$tmp" 2>/dev/null || true # apt downloads as user _apt
    if ! (cd "$tmp" && apt-get download -q "$pkg" >&2); then
        rm -rf "$tmp"
        if [ "$APT_UPDATED" = 0 ] && [ -z "${UBLK_DR_VM_KERNEL_PKG:-}" ]; then
            # Stale package lists: the registry has moved on. Refresh and pick again.
            msg "download failed; refreshing the package lists and picking the kernel again"
            apt_update_once
            pkg=$(newest_kernel_pkg)
            [ -n "$pkg" ] || die "apt offers no linux-image-6.12+-amd64-unsigned package any more"
            fetch_kernel "$pkg"
            return
        fi
        die "apt-get download $pkg failed; check the apt sources, then run 'scripts/vm.sh setup --update'"
    fi
    local debs=("$tmp"/*.deb)
    deb=${debs[0]}
    msg "extracting $(basename "$deb")"
    mkdir "$tmp/x"
    dpkg-deb -x "$deb" "$tmp/x" || die "dpkg-deb -x $deb failed"
    moddir=$tmp/x/lib/modules/$kver
    [ -d "$moddir" ] || moddir=$tmp/x/usr/lib/modules/$kver
    [ -d "$moddir" ] || die "$pkg has no lib/modules/$kver"
    [ -f "$tmp/x/boot/vmlinuz-$kver" ] || die "$pkg has no boot/vmlinuz-$kver"
    if [ -z "$(find "$moddir" -name 'ublk_drv.ko*')" ]; then
        rm -rf "$tmp"
        die "$pkg has no ublk_drv module; pick another with UBLK_DR_VM_KERNEL_PKG=<package>"
    fi
    rm -rf "$kdir"
    mkdir -p "$kdir/lib/modules"
    mv "$tmp/x/boot/vmlinuz-$kver" "$kdir/vmlinuz"
    [ -f "$tmp/x/boot/config-$kver" ] && mv "$tmp/x/boot/config-$kver" "$kdir/config"
    mv "$moddir" "$kdir/lib/modules/$kver"
    rm -rf "$tmp"
    depmod -b "$kdir" "$kver" || die "depmod failed for $kver"
    echo "$pkg" >"$kdir/package"
    touch "$kdir/.complete"
    echo "$kver"
}

build_initramfs() {
    local kver=$1 kdir stage m line path name order=() seen=" " a
    kdir=$(kernel_dir "$kver")
    msg "building initramfs for $kver"
    [ -x /bin/busybox ] || die "/bin/busybox missing: apt-get install busybox-static"
    for m in "${BOOT_MODULES[@]}"; do
        local deps
        deps=$(modprobe -d "$kdir" -S "$kver" --show-depends "$m" 2>&1) ||
            die "cannot resolve module $m for $kver: $deps"
        while read -r line; do
            case $line in
            insmod\ *)
                path=${line#insmod }
                path=${path%% *}
                name=$(basename "$path")
                name=${name%.ko*}
                case $seen in *" $name "*) continue ;; esac
                seen="$seen$name "
                order+=("$name:$path")
                ;;
            esac
        done <<<"$deps"
    done
    stage=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    mkdir -p "$stage"/{bin,dev,proc,sys,ctl,lower,rw,host,tmp,lib/modules}
    cp /bin/busybox "$stage/bin/busybox"
    for a in $("$stage/bin/busybox" --list); do
        [ "$a" = busybox ] || ln -sf busybox "$stage/bin/$a"
    done
    install -m 0755 "$INIT_TEMPLATE" "$stage/init"
    [ "$(id -u)" = 0 ] && mknod -m 600 "$stage/dev/console" c 5 1
    : >"$stage/lib/modules/order"
    for m in "${order[@]}"; do
        name=${m%%:*}
        path=${m#*:}
        case $path in
        *.ko.xz) xz -dc "$path" >"$stage/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$path" >"$stage/lib/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$path" >"$stage/lib/modules/$name.ko" ;;
        *.ko) cp "$path" "$stage/lib/modules/$name.ko" ;;
        *) die "unexpected module file $path" ;;
        esac
        echo "$name" >>"$stage/lib/modules/order"
    done
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z |
        cpio --null -o -H newc -R 0:0 --quiet) >"$kdir/initramfs.cpio.tmp"
    mv "$kdir/initramfs.cpio.tmp" "$kdir/initramfs.cpio"
    initramfs_stamp "$kver" >"$kdir/initramfs.stamp"
    rm -rf "$stage"
    msg "guest modules (load order): $(printf '%s ' "${order[@]%%:*}")"
}

cmd_setup() {
    local update=0 kver pkg
    while [ $# -gt 0 ]; do
        case $1 in
        --update) update=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "setup: unknown argument '$1' (see scripts/vm.sh --help)" ;;
        esac
        shift
    done
    ensure_packages
    if ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
        die "cache dir $CACHE is not writable: run as root or set UBLK_DR_VM_CACHE"
    fi
    exec 9>>"$CACHE/.lock"
    flock 9
    [ "$update" = 1 ] && rm -f "$CACHE/$QEMU_KEEP_MARKER"
    ensure_fast_qemu
    # leftovers of an interrupted setup
    rm -rf "$CACHE"/dl.* "$CACHE"/initramfs.*
    kver=$(current_kver || true)
    if [ -n "${UBLK_DR_VM_KERNEL_PKG:-}" ]; then
        pkg=$UBLK_DR_VM_KERNEL_PKG
        kver=${pkg#linux-image-}
        kver=${kver%-unsigned}
    elif [ -z "$kver" ] || ! kernel_complete "$kver" || [ "$update" = 1 ]; then
        [ "$update" = 1 ] && apt_update_once
        pkg=$(newest_kernel_pkg)
        if [ -z "$pkg" ]; then
            apt_update_once
            pkg=$(newest_kernel_pkg)
        fi
        [ -n "$pkg" ] || die "apt offers no linux-image-6.12+-amd64-unsigned package; check the apt sources (Debian bookworm-security or bookworm-backports has them) or set UBLK_DR_VM_KERNEL_PKG"
        kver=${pkg#linux-image-}
        kver=${kver%-unsigned}
    fi
    if ! kernel_complete "$kver"; then
        kver=$(fetch_kernel "${pkg:-linux-image-$kver-unsigned}")
    fi
    if [ "$(current_kver || true)" != "$kver" ]; then
        echo "$kver" >"$CACHE/current.tmp"
        mv "$CACHE/current.tmp" "$CACHE/current"
    fi
    initramfs_current "$kver" || build_initramfs "$kver"
    if [ "$update" = 1 ]; then
        local old
        for old in "$CACHE"/kernel-*; do
            [ "$old" = "$(kernel_dir "$kver")" ] || [ ! -d "$old" ] || {
                msg "removing the older kernel $(basename "$old")"
                rm -rf "$old"
            }
        done
    fi
    flock -u 9
    exec 9>&-
}

ready() {
    local kver
    command -v "$QEMU" >/dev/null 2>&1 || return 1
    qemu_has_fast_aes || [ -e "$CACHE/$QEMU_KEEP_MARKER" ] || return 1
    kver=$(current_kver 2>/dev/null) || return 1
    [ -n "$kver" ] && kernel_complete "$kver" && initramfs_current "$kver"
}

cmd_info() {
    local kver kdir
    echo "cache:   $CACHE"
    if kver=$(current_kver 2>/dev/null) && [ -n "$kver" ]; then
        kdir=$(kernel_dir "$kver")
        echo "kernel:  $kver ($(cat "$kdir/package" 2>/dev/null || echo '?'))"
        echo "vmlinuz: $kdir/vmlinuz"
        echo "initrd:  $kdir/initramfs.cpio"
        echo "modules: $kdir/lib/modules/$kver"
        if ready; then echo "state:   ready"; else echo "state:   needs 'scripts/vm.sh setup'"; fi
    else
        echo "kernel:  none (run 'scripts/vm.sh setup')"
    fi
    if [ -e /dev/ublk-control ]; then
        echo "host:    has /dev/ublk-control ('run' runs natively unless UBLK_DR_FORCE_VM=1)"
    else
        echo "host:    no /dev/ublk-control ('run' uses the guest)"
    fi
}

# ------------------------------------------------------------------------------ run

# Single-quote a string for busybox sh.
sq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

CLEAN_CTL=
CLEAN_SHARE=
cleanup() {
    if [ -n "$CLEAN_CTL" ]; then rm -rf -- "$CLEAN_CTL" || true; fi
    # the default share is removed only if the guest left nothing in it
    if [ -n "$CLEAN_SHARE" ]; then rmdir -- "$CLEAN_SHARE" 2>/dev/null || true; fi
}

RUN_PID=
on_signal() {
    msg "caught SIG$1: stopping the guest"
    if [ -s "$CLEAN_CTL/qemu.pid" ]; then
        kill -TERM "$(cat "$CLEAN_CTL/qemu.pid")" 2>/dev/null || true
    fi
    [ -n "$RUN_PID" ] && wait "$RUN_PID" 2>/dev/null
    exit $((128 + $2))
}

cmd_run() {
    local mem=4096 cpus=2 timeout=${UBLK_DR_VM_TIMEOUT:-3600} share='' verbose=0
    local extra_env=()
    while [ $# -gt 0 ]; do
        case $1 in
        --mem) is_uint "${2:-}" || die "--mem needs a number of MiB"; mem=$2; shift ;;
        --mem=*) mem=${1#*=} ;;
        --cpus) is_uint "${2:-}" || die "--cpus needs a number"; cpus=$2; shift ;;
        --cpus=*) cpus=${1#*=} ;;
        --timeout) is_uint "${2:-}" || die "--timeout needs seconds"; timeout=$2; shift ;;
        --timeout=*) timeout=${1#*=} ;;
        --share) [ -n "${2:-}" ] || die "--share needs a directory"; share=$2; shift ;;
        --share=*) share=${1#*=} ;;
        --env) [ -n "${2:-}" ] || die "--env needs NAME or NAME=VALUE"; extra_env+=("$2"); shift ;;
        --env=*) extra_env+=("${1#*=}") ;;
        -v | --verbose) verbose=1 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "run: unknown option '$1'; put the command after '--' (see scripts/vm.sh --help)" ;;
        esac
        shift
    done
    [ $# -gt 0 ] || die "run: no command given; usage: scripts/vm.sh run [OPTIONS] -- CMD [ARGS...]"
    if ! is_uint "$mem" || ! is_uint "$cpus" || ! is_uint "$timeout"; then
        die "--mem, --cpus and --timeout take plain numbers"
    fi

    local share_is_temp=0
    if [ -n "$share" ]; then
        mkdir -p -- "$share" || die "cannot create --share directory $share"
        share=$(cd -- "$share" && pwd -P)
        [ "$share" != / ] || die "--share / makes no sense: the host root is already visible"
    fi

    local e name
    # Native mode: the host kernel has ublk (or we are the guest already).
    if [ "${UBLK_DR_IN_VM:-}" = 1 ] ||
        { [ -e /dev/ublk-control ] && [ "${UBLK_DR_FORCE_VM:-}" != 1 ]; }; then
        if [ "${UBLK_DR_IN_VM:-}" = 1 ]; then
            msg "already inside the VM: running natively"
        else
            msg "host kernel has /dev/ublk-control: running natively (UBLK_DR_FORCE_VM=1 forces the VM)"
        fi
        for e in "${extra_env[@]}"; do
            case $e in *=*) export "${e?}" ;; *) ;; esac
        done
        [ -n "$share" ] && export UBLK_DR_VM_SHARE="$share"
        exec "$@"
    fi

    if ! ready; then
        cmd_setup
        ready || die "setup did not leave a usable kernel in $CACHE"
    fi
    local kver kdir
    kver=$(current_kver)
    kdir=$(kernel_dir "$kver")

    case $PWD/ in
    /tmp/* | /run/*)
        # The guest replaces /tmp and /run with empty tmpfs: share the working tree (the
        # git checkout around it, e.g. a CI clone under /tmp) at the same path instead.
        if [ -z "$share" ]; then
            share=$(git -C "$PWD" rev-parse --show-toplevel 2>/dev/null || echo "$PWD")
            msg "the working directory is under /tmp or /run: sharing $share into the guest"
        fi
        case $PWD/ in
        "$share"/*) ;;
        *) msg "warning: the working directory $PWD is under /tmp or /run, which the guest replaces with an empty tmpfs; run from elsewhere or --share it" ;;
        esac
        ;;
    esac

    local ctl
    ctl=$(mktemp -d "${TMPDIR:-/tmp}/ublk-dr-vm.XXXXXX")
    if [ -z "$share" ]; then
        share=$(mktemp -d "${TMPDIR:-/tmp}/ublk-dr-vm-share.XXXXXX")
        share_is_temp=1
    fi
    CLEAN_CTL=$ctl
    CLEAN_SHARE=
    [ "$share_is_temp" = 1 ] && CLEAN_SHARE=$share
    trap cleanup EXIT

    local nonce
    nonce=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')

    # Terminal size for the guest console, when our stdout is a terminal.
    local rows='' cols='' term=${TERM:-dumb} tty=0
    if [ -t 1 ]; then
        tty=1
        read -r rows cols < <(stty size </dev/tty 2>/dev/null || true) || true
    else
        term=dumb
    fi

    {
        echo "NONCE=$(sq "$nonce")"
        echo "SHARE=$(sq "$share")"
        echo "KVER=$(sq "$kver")"
        echo "MODDIR=$(sq "$kdir/lib/modules/$kver")"
        echo "TTY=$(sq "$tty")"
        echo "ROWS=$(sq "$rows")"
        echo "COLS=$(sq "$cols")"
        echo "OVERLAY=$(sq "${UBLK_DR_VM_OVERLAY:-1}")"
        echo "DEBUG=$(sq "${UBLK_DR_VM_DEBUG:-0}")"
        echo "ROOT_9P_OPTS=$(sq "${UBLK_DR_VM_ROOT_9P_OPTS:-}")"
    } >"$ctl/init.conf"

    local path=${PATH:-/usr/bin:/bin} d
    for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
        case ":$path:" in *":$d:"*) ;; *) path=$path:$d ;; esac
    done
    {
        echo "# generated by scripts/vm.sh; runs in the guest under bash"
        printf 'export PATH=%q\n' "$path"
        for name in "${PASS_ENV[@]}"; do
            [ "$name" = TERM ] && continue
            [ -n "${!name+x}" ] && printf 'export %s=%q\n' "$name" "${!name}"
        done
        printf 'export TERM=%q\n' "$term"
        while read -r name; do
            [[ $name =~ ^UBLK_DR_[A-Za-z0-9_]*$ ]] && printf 'export %s=%q\n' "$name" "${!name}"
        done < <(compgen -e)
        for e in "${extra_env[@]}"; do
            case $e in
            *=*) printf 'export %s=%q\n' "${e%%=*}" "${e#*=}" ;;
            *) [ -n "${!e+x}" ] && printf 'export %s=%q\n' "$e" "${!e}" ;;
            esac
        done
        printf 'export UBLK_DR_IN_VM=1 UBLK_DR_VM_SHARE=%q\n' "$share"
        # No udev in the guest: without this, dmsetup waits for udev to make
        # /dev/mapper/NAME, which never appears (only /dev/dm-N exists).
        printf 'export DM_DISABLE_UDEV=%q\n' "${DM_DISABLE_UDEV:-1}"
        printf 'cd -- %q || { echo "vm.sh (guest): cannot cd to %q: the host'"'"'s /tmp and /run are not visible in the guest; run from elsewhere or pass --share DIR" >&2; exit 125; }\n' "$PWD" "$PWD"
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$ctl/cmd.sh"

    # Without ERMS and FSRM the guest kernel and glibc copy with vector and 8-byte
    # moves instead of `rep movsb`, which TCG runs one byte at a time: 4 KiB memcpy
    # 360 -> 1700 MB/s, overwriting tmpfs pages 18 -> 340 MB/s.
    local accel=(-accel tcg -cpu "${UBLK_DR_VM_CPU:-max,-erms,-fsrm}")
    if [ "${UBLK_DR_VM_KVM:-}" = 1 ]; then
        [ -w /dev/kvm ] || die "UBLK_DR_VM_KVM=1 but /dev/kvm is not usable"
        accel=(-accel kvm -cpu host)
    elif [ -n "${UBLK_DR_VM_ICOUNT:-}" ]; then
        # Deterministic guest time: the clock advances by instructions executed, not
        # by host time, so a busy or noisy host does not change what the guest
        # measures. Needs single-threaded TCG (the vCPUs take turns on one host thread).
        accel=(-accel tcg,thread=single -cpu "${UBLK_DR_VM_CPU:-max,-erms,-fsrm}"
            -icount "shift=$UBLK_DR_VM_ICOUNT,sleep=off")
    fi
    local quiet=quiet
    [ "${UBLK_DR_VM_DEBUG:-}" = 1 ] && quiet=ublk_dr_debug=1
    # qemu option values: a comma is written as two
    local ctl_q=${ctl//,/,,} share_q=${share//,/,,}
    local secmodel=passthrough
    [ "$(id -u)" = 0 ] || secmodel=none
    # shellcheck disable=SC2054 # the commas are qemu's
    local qemu=("$QEMU" -nodefaults -no-user-config -no-reboot -display none -monitor none
        "${accel[@]}" -m "$mem" -smp "$cpus"
        -kernel "$kdir/vmlinuz" -initrd "$kdir/initramfs.cpio"
        -append "console=ttyS0 $quiet panic=-1 mitigations=off ${UBLK_DR_VM_APPEND:-}"
        -chardev stdio,id=con0,signal=off -serial chardev:con0
        -virtfs "local,path=/,mount_tag=hostroot,security_model=$secmodel,readonly=on,multidevs=remap"
        -virtfs "local,path=$ctl_q,mount_tag=ublkctl,security_model=$secmodel,multidevs=remap"
        -virtfs "local,path=$share_q,mount_tag=ublkshare,security_model=$secmodel,multidevs=remap")

    local t0 t1 qst qrc status='' attempt
    t0=$(date +%s.%N)
    for attempt in 1 2 3; do
        rm -f "$ctl/marker" "$ctl/status" "$ctl/qemu.rc" "$ctl/boot-seconds" "$ctl/end-seconds" \
            "$ctl/error" "$ctl/qemu.pid"
        # qemu runs in the background so that a signal to vm.sh (Ctrl-C, a CI timeout) can
        # stop it; the sed filter strips the exit marker and the kernel's last words.
        {
            qrc=0
            timeout --foreground -k 10 "$timeout" "${qemu[@]}" -pidfile "$ctl/qemu.pid" \
                </dev/null 2>"$ctl/qemu.err" || qrc=$?
            echo "$qrc" >"$ctl/qemu.rc"
        } | sed -u -e 's/\r$//' \
            -e "/$MARKER $nonce [0-9]*@@/{" -e "w $ctl/marker" \
            -e "s/$MARKER $nonce [0-9]*@@//" -e '/^$/d' -e '}' \
            -e '/^\[ *[0-9.]*\] reboot: Power down$/d' &
        RUN_PID=$!
        trap 'on_signal INT 2' INT
        trap 'on_signal TERM 15' TERM
        trap 'on_signal HUP 1' HUP
        wait "$RUN_PID" || true
        trap - INT TERM HUP
        qst=$(cat "$ctl/qemu.rc" 2>/dev/null || echo '?')

        status=
        if [ -s "$ctl/marker" ]; then
            status=$(sed -nE "s/.*$MARKER $nonce ([0-9]+)@@.*/\1/p" "$ctl/marker" | tail -n 1)
        fi
        if [ -z "$status" ] && [ -s "$ctl/status" ]; then
            status=$(tr -dc 0-9 <"$ctl/status")
        fi
        # A guest that died before CMD started ran nothing, so booting again is safe.
        # Under TCG the kernel sometimes panics at boot (an int3 oops while it patches
        # its own code); a second boot gets past it.
        if [ -z "$status" ] && [ ! -s "$ctl/boot-seconds" ] && [ ! -s "$ctl/error" ] && [ "$qst" != 124 ] &&
            [ "$qst" != 137 ] && [ "$attempt" -lt 3 ]; then
            msg "the guest died before CMD started (boot $attempt of 3); booting again"
            continue
        fi
        break
    done
    t1=$(date +%s.%N)

    local boot='?' end='?'
    [ -s "$ctl/boot-seconds" ] && boot=$(cat "$ctl/boot-seconds")
    [ -s "$ctl/end-seconds" ] && end=$(cat "$ctl/end-seconds")
    if [ -z "$status" ]; then
        if [ -s "$ctl/qemu.err" ] && [ "$qst" != 124 ]; then
            sed 's/^/qemu: /' "$ctl/qemu.err" >&2
        fi
        [ -s "$ctl/error" ] && sed 's/^/guest: /' "$ctl/error" >&2
        if [ "$qst" = 137 ] && awk -v t0="$t0" -v t1="$t1" -v t="$timeout" 'BEGIN { exit !(t1 - t0 < t) }'; then
            msg "error: qemu was killed (SIGKILL) before the guest reported CMD's exit status"
            status=137
        elif [ "$qst" = 124 ] || [ "$qst" = 137 ]; then
            msg "error: the guest timed out after ${timeout}s (--timeout) and was killed"
            status=124
        else
            msg "error: the guest stopped without reporting CMD's exit status: kernel panic, guest init failure or qemu failure (qemu exit status $qst; see the output above)"
            if [ "${UBLK_DR_VM_KVM:-}" = 1 ]; then
                msg "hint: KVM does not work on every host; unset UBLK_DR_VM_KVM to use TCG"
            fi
            status=125
        fi
    elif [ "$status" != 0 ] || [ "$verbose" = 1 ]; then
        msg "guest command exited with status $status"
    fi
    if [ "$verbose" = 1 ]; then
        msg "$(awk -v t0="$t0" -v t1="$t1" -v b="$boot" -v e="$end" 'BEGIN {
            if (b != "?" && e != "?") printf "wall %.1fs; guest kernel uptime at CMD start %.2fs, CMD %.1fs", t1 - t0, b, e - b;
            else printf "wall %.1fs", t1 - t0 }')"
    fi
    if [ "$share_is_temp" = 1 ] && [ -n "$(ls -A -- "$share" 2>/dev/null)" ]; then
        msg "files written to the shared directory are kept in $share"
    fi
    exit "$status"
}

# ----------------------------------------------------------------------------- main

case ${1:-} in
setup) shift; cmd_setup "$@" ;;
run) shift; cmd_run "$@" ;;
info) shift; cmd_info ;;
-h | --help | help) usage ;;
'') usage >&2; exit 125 ;;
*) die "unknown command '$1' (expected setup, run or info; see scripts/vm.sh --help)" ;;
esac
