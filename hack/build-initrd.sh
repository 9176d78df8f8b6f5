#!/usr/bin/env bash
# Builds the guest initramfs: /init is hyperstart (static musl), plus the empty mount points and
# /dev/console so the kernel can give init a console before devtmpfs is mounted.
#
# Output: ${HYPERNETES_BUILD:-/work/main/build}/guest/initrd.img (uncompressed newc cpio: the
# image is small, and an uncompressed initramfs skips decompression at boot).
# Idempotent: the image is rebuilt only when the hyperstart binary changed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${HYPERNETES_BUILD:-${REPO}/build}"
OUT_DIR="${BUILD}/guest"
OUT="${OUT_DIR}/initrd.img"
TARGET=x86_64-unknown-linux-musl

die() { echo "build-initrd: $*" >&2; exit 1; }
command -v cpio >/dev/null || die "cpio is missing (apt-get install cpio)"
[[ "$(id -u)" == 0 ]] || die "must run as root (creates the /dev/console node)"

if ! rustup target list --installed 2>/dev/null | grep -qx "${TARGET}"; then
    rustup target add "${TARGET}"
fi

# cargo is itself incremental: a no-op build takes well under a second.
(cd "${REPO}" && cargo build --release --locked -p agent --target "${TARGET}")
TARGET_DIR="$(cd "${REPO}" && cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
BIN="${TARGET_DIR}/${TARGET}/release/hyperstart"
[[ -x "${BIN}" ]] || die "${BIN} was not built"
if file "${BIN}" 2>/dev/null | grep -q "dynamically linked"; then
    die "${BIN} is dynamically linked"
fi

mkdir -p "${OUT_DIR}"
if [[ -f "${OUT}" && "${OUT}" -nt "${BIN}" && "${OUT}" -nt "${BASH_SOURCE[0]}" ]]; then
    echo "${OUT} is up to date"
else
    STAGE="$(mktemp -d "${OUT_DIR}/.initrd.XXXXXX")"
    trap 'rm -rf "${STAGE}"' EXIT
    mkdir -p "${STAGE}"/{dev,proc,sys,run,tmp}
    chmod 1777 "${STAGE}/tmp"
    # Debug info stays in target/ for symbolizing; the guest gets a stripped copy.
    install -m 0755 "${BIN}" "${STAGE}/init"
    if command -v strip >/dev/null; then strip --strip-all "${STAGE}/init"; fi
    mknod -m 0600 "${STAGE}/dev/console" c 5 1
    # Fixed timestamps and a sorted list: same binary, same image.
    find "${STAGE}" -exec touch -h -d @0 {} +
    (cd "${STAGE}" && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible > "${OUT}.tmp")
    mv -f "${OUT}.tmp" "${OUT}"
fi

echo "hyperstart: ${BIN} ($(stat -c %s "${BIN}") bytes unstripped)"
echo "initrd: ${OUT} ($(stat -c %s "${OUT}") bytes)"
echo "${OUT}"
