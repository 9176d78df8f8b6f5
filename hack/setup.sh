#!/usr/bin/env bash
# Install everything the Hypernetes build and tests need (Debian bookworm).
# Idempotent: only missing packages are installed, `apt-get update` runs only
# when an install is needed and the package lists are missing or stale.
# Quiet unless something fails.
set -euo pipefail

PROG=setup.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }

PACKAGES=(
    build-essential pkg-config protobuf-compiler
    linux-source-6.1 bc flex bison libelf-dev libssl-dev
    qemu-system-x86 linux-image-amd64 busybox-static cpio kmod
    iproute2 e2fsprogs socat lz4 python3
    docker-registry skopeo runc containerd containernetworking-plugins iptables
)
RUST_TARGETS=(x86_64-unknown-linux-musl)

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]; }

# Run a command quietly; show its output only if it fails.
quiet() {
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    if ((rc)); then
        printf '%s\n' "$out" >&2
        echo "$PROG: error: '$*' failed with status $rc" >&2
        return "$rc"
    fi
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "not root and no sudo: cannot install ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only if they are missing or older than a day.
    lists=(/var/lib/apt/lists/*_Packages)
    if [[ ! -e ${lists[0]} ]] || [[ -n $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages' -mtime +0 -print -quit) ]]; then
        quiet "${sudo[@]}" apt-get update -q
    fi
    if ! quiet "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        # The lists may be out of date (a package version vanished): refresh once and retry.
        quiet "${sudo[@]}" apt-get update -q
        quiet "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    echo "$PROG: installed ${missing[*]}"
fi

if ! command -v rustup >/dev/null && [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/rustup ]]; then
    PATH=${CARGO_HOME:-$HOME/.cargo}/bin:$PATH
fi
command -v rustup >/dev/null || die "rustup not found: install the Rust toolchain (https://rustup.rs) first"
installed_targets=$'\n'$(rustup target list --installed 2>/dev/null)$'\n'
for t in "${RUST_TARGETS[@]}"; do
    if [[ $installed_targets != *$'\n'"$t"$'\n'* ]]; then
        quiet rustup target add "$t"
        echo "$PROG: added Rust target $t"
    fi
done
