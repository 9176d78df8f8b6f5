#!/usr/bin/env bash
# make boot-bench: hyper-vmm against QEMU microvm inside one KVM test VM boot.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=$(hack/build-guest-kernel.sh | tail -n 1)
initrd=$(hack/build-initrd.sh | tail -n 1)
vmm=$(hack/build-vmm.sh | tail -n 1)
exec hack/kvm-vm --timeout "${BENCH_TIMEOUT:-1800}" -- \
    python3 hack/boot-bench.py "$kernel" "$initrd" "$vmm" "${RUNS:-7}"
