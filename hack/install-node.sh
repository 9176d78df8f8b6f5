#!/usr/bin/env bash
# Install the containerd side of Hypernetes on a node: containerd-shim-hyper-v1 and what it runs.
#
#   hack/install-node.sh [--root DIR] [--containerd-config FILE] [--no-build]
#
# Builds (unless --no-build) hyper-vmm, the guest kernel, the initramfs and the shim, then installs
#   /usr/local/lib/hypernetes/{hyper-vmm,vmlinux,initrd.img}
#   /usr/local/bin/containerd-shim-hyper-v1    (containerd looks for shims on its PATH)
#   /etc/hyperd/shim.toml                      (deploy/shim/shim.toml; an existing file is kept)
# and adds the runtime handler `hyper` (deploy/shim/containerd-hyper.toml) to containerd's config
# (--containerd-config, default /etc/containerd/config.toml, config version 2) unless it has one.
# Restart containerd afterwards, and apply deploy/runtimeclass.yaml to the cluster.
#
# --root DIR installs below DIR instead of / (staging an image, or trying the script out).
# --no-build takes the artifacts from HYPERNETES_VMM, HYPERNETES_KERNEL, HYPERNETES_INITRD and
# HYPERNETES_SHIM instead. Needs root (the initramfs build creates a device node).
set -euo pipefail

PROG=install-node.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }
cd "$(dirname "$0")/.."

root=
containerd_config=/etc/containerd/config.toml
build=1
while (($#)); do
    case $1 in
        --root) [[ $# -ge 2 ]] || die "--root needs a directory"; root=${2%/}; shift 2 ;;
        --containerd-config) [[ $# -ge 2 ]] || die "--containerd-config needs a file"; containerd_config=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -z $root || $root == /* ]] || die "--root must be an absolute path"

if ((build)); then
    [[ $(id -u) -eq 0 ]] || die "building the initramfs needs root"
    vmm=$(hack/build-vmm.sh | tail -n 1)
    kernel=$(hack/build-guest-kernel.sh | tail -n 1)
    initrd=$(hack/build-initrd.sh | tail -n 1)
    cargo build --release --locked -p shim --bin containerd-shim-hyper-v1 >&2
    target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    shim=$target_dir/release/containerd-shim-hyper-v1
else
    vmm=${HYPERNETES_VMM:-}
    kernel=${HYPERNETES_KERNEL:-}
    initrd=${HYPERNETES_INITRD:-}
    shim=${HYPERNETES_SHIM:-}
fi
for f in "$vmm" "$kernel" "$initrd" "$shim"; do
    [[ -n $f && -f $f ]] || die "missing artifact '$f' (with --no-build set HYPERNETES_VMM, _KERNEL, _INITRD, _SHIM)"
done

lib=$root/usr/local/lib/hypernetes
install -d "$lib" "$root/usr/local/bin" "$root/etc/hyperd"
install -m 0755 "$vmm" "$lib/hyper-vmm"
install -m 0644 "$kernel" "$lib/vmlinux"
install -m 0644 "$initrd" "$lib/initrd.img"
# Replace the shim through a rename: a running shim keeps its (old) binary.
install -m 0755 "$shim" "$root/usr/local/bin/.containerd-shim-hyper-v1.new"
mv -f "$root/usr/local/bin/.containerd-shim-hyper-v1.new" "$root/usr/local/bin/containerd-shim-hyper-v1"
if [[ -e $root/etc/hyperd/shim.toml ]]; then
    note "keeping $root/etc/hyperd/shim.toml"
else
    install -m 0644 deploy/shim/shim.toml "$root/etc/hyperd/shim.toml"
fi

config=$root$containerd_config
if [[ -f $config ]] && grep -q 'containerd.runtimes.hyper\]' "$config"; then
    note "$config already has the hyper runtime"
else
    if [[ -f $config ]]; then
        grep -Eq '^[[:space:]]*version[[:space:]]*=[[:space:]]*2' "$config" ||
            die "$config is not a version 2 containerd config: add deploy/shim/containerd-hyper.toml by hand"
    else
        install -d "$(dirname "$config")"
        echo "version = 2" >"$config"
    fi
    { echo; cat deploy/shim/containerd-hyper.toml; } >>"$config"
    note "added the hyper runtime to $config: restart containerd"
fi
[[ -c /dev/kvm ]] || note "warning: this machine has no /dev/kvm; pods will not start here"
note "installed under ${root:-/}"
