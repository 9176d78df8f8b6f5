#!/usr/bin/env bash
# Build the minimal Hypernetes guest kernel from Debian's linux-source-6.1.
#
#   hack/build-guest-kernel.sh        # prints the bzImage path as the last line
#
# Steps: `make tinyconfig`, merge hack/guest-kernel.config with
# scripts/kconfig/merge_config.sh -m, `make olddefconfig`, check that every
# requested option survived, `make bzImage`.
#
# Output is cached outside the checkout in
#   ${XDG_CACHE_HOME:-$HOME/.cache}/hypernetes/guest-kernel/<key>/{bzImage,vmlinux,config}
# where <key> = sha256(fragment + linux-source-6.1 package version + this script).
# If that directory already exists the script prints the path and exits at once.
#
# Environment: JOBS (default: nproc) sets make -j.
set -euo pipefail

die() { echo "build-guest-kernel: error: $*" >&2; exit 1; }
log() { echo "build-guest-kernel: $*" >&2; }

HACK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT=$HACK_DIR/guest-kernel.config
SELF=$HACK_DIR/$(basename "${BASH_SOURCE[0]}")
SRC_PKG=linux-source-6.1
SRC_TARBALL=/usr/src/linux-source-6.1.tar.xz
[[ -f $FRAGMENT ]] || die "config fragment $FRAGMENT not found"

# --- Build dependencies ------------------------------------------------------
need_pkgs=()
for p in "$SRC_PKG" bc flex bison libelf-dev libssl-dev make gcc libc6-dev xz-utils lz4; do
    if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true) != "install ok installed" ]]; then
        need_pkgs+=("$p")
    fi
done
if ((${#need_pkgs[@]})); then
    log "installing missing packages: ${need_pkgs[*]}"
    [[ $(id -u) -eq 0 ]] || die "packages missing (${need_pkgs[*]}) and not root: install them first"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "${need_pkgs[@]}" >/dev/null; then
        apt-get update -q >/dev/null || die "apt-get update failed"
        apt-get install -y -q "${need_pkgs[@]}" >/dev/null || die "apt-get install ${need_pkgs[*]} failed"
    fi
fi
[[ -f $SRC_TARBALL ]] || die "$SRC_TARBALL missing although $SRC_PKG is installed"

# --- Cache lookup ------------------------------------------------------------
src_version=$(dpkg-query -W -f='${Version}' "$SRC_PKG")
key=$( { cat "$FRAGMENT"; printf '\n%s\n' "$src_version"; cat "$SELF"; } | sha256sum | cut -d' ' -f1)
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/hypernetes/guest-kernel
out=$cache_root/$key
if [[ -f $out/bzImage && -f $out/vmlinux && -f $out/config ]]; then
    log "cached: $out"
    echo "$out/bzImage"
    exit 0
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

start=$SECONDS
log "building guest kernel ($SRC_PKG $src_version, key ${key:0:12}) in $work"
log "extracting $SRC_TARBALL"
tar -xf "$SRC_TARBALL" -C "$work"
ksrc=$work/linux-source-6.1
[[ -d $ksrc ]] || die "unexpected tarball layout: $ksrc missing"

kmake() { make -C "$ksrc" ARCH=x86_64 "$@"; }

log "configuring (tinyconfig + $(basename "$FRAGMENT"))"
kmake tinyconfig >"$work/config.log" 2>&1 || { cat "$work/config.log" >&2; die "make tinyconfig failed"; }
(cd "$ksrc" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") >>"$work/config.log" 2>&1 \
    || { cat "$work/config.log" >&2; die "merge_config.sh failed"; }
kmake olddefconfig >>"$work/config.log" 2>&1 || { cat "$work/config.log" >&2; die "make olddefconfig failed"; }

# --- Verify: every option of the fragment must have survived -----------------
# `CONFIG_X=v` lines must appear verbatim; `# CONFIG_X is not set` lines must
# not be enabled (=y/=m) in the final config.
missing=()
checked=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]}
        checked=$((checked + 1))
        if ! grep -qxF -- "$line" "$ksrc/.config"; then
            got=$(grep -E "^(# )?${sym}[= ]" "$ksrc/.config" || echo "absent")
            missing+=("$line   (final: $got)")
        fi
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        sym=${BASH_REMATCH[1]}
        checked=$((checked + 1))
        if grep -qE "^${sym}=[ym]$" "$ksrc/.config"; then
            missing+=("# $sym is not set   (final: $(grep -E "^${sym}=" "$ksrc/.config"))")
        fi
    fi
done <"$FRAGMENT"
if ((${#missing[@]})); then
    echo "build-guest-kernel: error: these requested options did not end up in the final .config" >&2
    echo "(dropped by unmet dependencies or overridden):" >&2
    printf '  %s\n' "${missing[@]}" >&2
    grep -E '^(Value requested|Requested value|Actual value)' "$work/config.log" >&2 || true
    exit 1
fi
log "all $checked options of the fragment verified in .config"

log "compiling bzImage with -j${JOBS:-$(nproc)} (log: $work/build.log)"
if ! kmake -j"${JOBS:-$(nproc)}" bzImage >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log" >&2
    die "kernel build failed"
fi

stage=$work/out
mkdir -p "$stage"
cp "$ksrc/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$ksrc/vmlinux" "$stage/vmlinux"
cp "$ksrc/.config" "$stage/config"
rm -rf "$out"
mv "$stage" "$out"
log "built in $((SECONDS - start)) s: bzImage $(stat -c %s "$out/bzImage") bytes, vmlinux $(stat -c %s "$out/vmlinux") bytes"
echo "$out/bzImage"
