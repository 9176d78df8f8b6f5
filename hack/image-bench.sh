#!/usr/bin/env bash
# make image-bench: pull + unpack + ext4 rootfs disk of a ~50 MB multi-layer image from a local
# docker-registry, against skopeo copy + umoci unpack of the same image (median of RUNS=5 each).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(docker-registry skopeo umoci busybox-static e2fsprogs diffutils)
installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]; }
missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "image-bench.sh: not root and no sudo: cannot install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
    echo "image-bench.sh: installed ${missing[*]}"
fi

exec "${CARGO:-cargo}" run --release -q -p image --example image_bench
