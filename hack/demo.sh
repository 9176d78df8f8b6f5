#!/usr/bin/env bash
# The main job: run a pod as a VM, offline, on the built-in busybox image:
#   hyperctl run --rm busybox echo hello from a VM
# against hyperd. This machine's /dev/kvm cannot boot a stock guest (PVM; see
# ../shared/ENVIRONMENT.md), so hyperd runs inside the KVM test VM (hack/kvm-vm); with
# HYPERNETES_DEMO_DIRECT=1 on a host with VT-x/AMD-V it runs directly.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=$(hack/build-guest-kernel.sh | tail -n 1)
initrd=$(hack/build-initrd.sh | tail -n 1)
vmm=$(hack/build-vmm.sh | tail -n 1)
cargo build --release -q -p cri --bin hyperd -p ctl --bin hyperctl
# The built-in default image: busybox-static as a one-layer docker archive (no registry).
build=${HYPERNETES_BUILD:-$PWD/build}
mkdir -p "$build/images"
[ -s "$build/images/busybox.tar" ] || hack/containerd-test.sh image busybox "$build/images/busybox.tar"
args=("$PWD/target/release/hyperd" "$PWD/target/release/hyperctl" "$vmm" "$kernel" "$initrd" "$build/images/busybox.tar")
if [ "${HYPERNETES_DEMO_DIRECT:-0}" = 1 ]; then
    exec hack/demo-pod.sh "${args[@]}"
fi
exec hack/kvm-vm --timeout 900 -- "$PWD/hack/demo-pod.sh" "${args[@]}"
