# Shared helpers for the scripts: messages and installing what is missing.
# shellcheck shell=bash

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages that are not installed yet (one apt-get update at most).
ensure_debs() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing Debian packages: ${missing[*]}"
  local sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Rust toolchain (cargo), a C compiler for crates that build C, and libclang for
# bindgen (libublk's bindings): everything a build of the workspace needs.
ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    ensure_debs cargo rustc
  fi
  command -v cc >/dev/null 2>&1 || ensure_debs gcc libc6-dev
  ensure_debs libclang-dev
}

# Azurite (Microsoft's Azure Storage emulator) and the Azure SDK for JavaScript, which
# the object-storage tests use to create containers; from the npm registry, cached.
# Exports UBLK_DR_AZURITE_DIR, where the tests find them.
ensure_azurite() {
  local dir=${UBLK_DR_AZURITE_DIR:-/var/cache/ublk-dr/azurite}
  if [ ! -x "$dir/node_modules/.bin/azurite-blob" ] || [ ! -d "$dir/node_modules/@azure/storage-blob" ]; then
    command -v npm >/dev/null 2>&1 || ensure_debs nodejs npm
    step "installing azurite and @azure/storage-blob (npm) into $dir"
    mkdir -p "$dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund azurite@3 @azure/storage-blob@12 >/dev/null)
  fi
  export UBLK_DR_AZURITE_DIR=$dir
}

# moto's S3 server and boto3 (to create buckets) in a Python virtual environment, for
# the object-storage tests; from PyPI, cached. Exports UBLK_DR_MOTO_DIR.
ensure_moto() {
  local dir=${UBLK_DR_MOTO_DIR:-/var/cache/ublk-dr/moto}
  if [ ! -x "$dir/bin/moto_server" ]; then
    python3 -m venv --help >/dev/null 2>&1 || ensure_debs python3-venv
    step "installing moto[server] (PyPI) into $dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet "moto[server]>=5.1,<6"
  fi
  export UBLK_DR_MOTO_DIR=$dir
}

# A directory on XFS with reflink, for the tests of undo journals that share the
# replica's blocks: a sparse image on a loop device, made and mounted once per boot
# (it needs root). Exports UBLK_DR_REFLINK_DIR, which names an existing one instead.
ensure_reflink_dir() {
  local mnt=${UBLK_DR_REFLINK_DIR:-/run/ublk-dr/reflink} img=/var/tmp/ublk-dr-reflink.xfs
  if [ -z "${UBLK_DR_REFLINK_DIR:-}" ] && ! mountpoint -q "$mnt"; then
    [ "$(id -u)" -eq 0 ] || die "the reflink tests mount an XFS image on a loop device: run as root, or set UBLK_DR_REFLINK_DIR to a directory on XFS or btrfs"
    command -v mkfs.xfs >/dev/null 2>&1 || ensure_debs xfsprogs
    step "making an XFS image with reflink on a loop device at $mnt"
    mkdir -p "$mnt"
    rm -f "$img"
    truncate -s 2G "$img"
    mkfs.xfs -q -m reflink=1 "$img"
    mount -o loop "$img" "$mnt" || die "cannot loop-mount $img on $mnt (no loop devices here?)"
  fi
  export UBLK_DR_REFLINK_DIR=$mnt
}
