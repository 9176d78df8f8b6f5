#!/usr/bin/env bash
# The main job: boot a pod VM offline on the built-in guest (our kernel + hyperstart), inside the
# KVM test VM where this machine's /dev/kvm cannot boot a stock guest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HYPERNETES_KERNEL HYPERNETES_INITRD HYPERNETES_VMM
HYPERNETES_KERNEL=$(hack/build-guest-kernel.sh | tail -n 1)
HYPERNETES_INITRD=$(hack/build-initrd.sh | tail -n 1)
HYPERNETES_VMM=$(hack/build-vmm.sh | tail -n 1)
cargo build --release -p e2e --bin pod-vm-demo
exec hack/kvm-vm --timeout 900 -- "$PWD/target/release/pod-vm-demo"
