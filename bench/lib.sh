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
    machine+="; VM: $(qemu-system-x86_64 --version | sed -nE '1s/^QEMU emulator version ([^ ]+).*/qemu \1/p') TCG -cpu ${UBLK_DR_VM_CPU:-max,-erms,-fsrm}, 2 vCPUs, 8 GiB, Debian 6.12 kernel; $where"
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
