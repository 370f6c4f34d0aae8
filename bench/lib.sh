# Sourced by the bench scripts: the head of a bench/RESULTS.md section.

# results_section TITLE [WHERE]: blank line, "## TITLE", date, machine and commit.
# Without WHERE the bench ran on the host. With WHERE it ran under scripts/vm.sh (the
# guest described, or the host kernel where it has ublk) and WHERE says where its data
# lived.
results_section() {
  local title=$1 where=${2-} machine
  machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
  if [ -z "$where" ]; then
    machine+=", kernel $(uname -r)"
  elif [ -e /dev/ublk-control ]; then
    machine+="; native kernel $(uname -r); $where"
  else
    local tcg="TCG -cpu ${UBLK_DR_VM_CPU:-max,-erms,-fsrm}"
    # Under -icount the guest's clock counts instructions: figures measure CPU work.
    [ -n "${UBLK_DR_VM_ICOUNT:-}" ] && tcg+=" -icount shift=$UBLK_DR_VM_ICOUNT,sleep=off (guest time = instructions executed)"
    machine+="; VM: $(qemu-system-x86_64 --version | sed -nE '1s/^QEMU emulator version ([^ ]+).*/qemu \1/p') $tcg, 2 vCPUs, 8 GiB, Debian 6.12 kernel; $where"
  fi
  echo
  echo "## $title"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- machine: $machine"
  # RESULTS.md itself is being appended to (this output goes there): not "dirty".
  echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet -- . ':!bench/RESULTS.md' || echo '-dirty')"
  echo
}

# Guest side (bench/*-guest.sh):

# bench_tmpfs DIR SIZE: DIR, empty, on a tmpfs of its own of SIZE (larger than the
# default half of RAM where the bench needs it), so the disk is not what is measured.
bench_tmpfs() {
  rm -rf "$1"; mkdir -p "$1"
  mountpoint -q "$1" || mount -t tmpfs -o size="$2" tmpfs "$1"
}

# random_backing FILE: a 1 GiB backing file filled with random data, so reads hit real
# data and writes overwrite allocated pages.
random_backing() {
  truncate -s 1G "$1"
  dd if=/dev/urandom of="$1" bs=1M count=1024 status=none conv=notrunc
}
