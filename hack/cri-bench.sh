#!/usr/bin/env bash
# make cri-bench: pod start latency through CRI, hyperd (every pod a VM) against containerd + runc,
# both in ONE boot of the KVM test VM, with `hyperctl bench`; plus the host memory of an idle pod.
# Offline: both pull the same busybox image from a local docker-registry.
#
#   CRI_BENCH_PODS=20 CRI_BENCH_PARALLEL=4 CRI_BENCH_IDLE=5 make cri-bench
#
# Last line: pod_start_ms hyperd=<p50> containerd-runc=<p50> ratio=<hyperd/runc>
#
# CRI_BENCH_MODE=shim (make shim-bench): one containerd with runtime handlers hyper
# (containerd-shim-hyper-v1) and runc instead; last line
# pod_start_ms containerd-hyper=<p50> containerd-runc=<p50> ratio=<hyper/runc>
set -euo pipefail
cd "$(dirname "$0")/.."

kernel=$(hack/build-guest-kernel.sh | tail -n 1)
initrd=$(hack/build-initrd.sh | tail -n 1)
vmm=$(hack/build-vmm.sh | tail -n 1)
# One build: the same feature set for all three (separate builds would each rebuild shared
# dependencies with their own features).
cargo build --release -q -p cri --bin hyperd -p ctl --bin hyperctl -p e2e --bin cri-bench \
    -p shim --bin containerd-shim-hyper-v1
# containerd's CNI result cache: the test VM mounts a tmpfs over it (its root is read-only).
mkdir -p /var/lib/cni
export HYPERNETES_KERNEL="$kernel" HYPERNETES_INITRD="$initrd" HYPERNETES_VMM="$vmm"
export HYPERNETES_HYPERD=$PWD/target/release/hyperd
export HYPERNETES_HYPERCTL=$PWD/target/release/hyperctl
export HYPERNETES_SHIM=$PWD/target/release/containerd-shim-hyper-v1
exec hack/kvm-vm --timeout "${CRI_BENCH_TIMEOUT:-2400}" --hang-timeout 180 \
    --env CRI_BENCH_PODS --env CRI_BENCH_PARALLEL --env CRI_BENCH_IDLE --env CRI_BENCH_MODE -- "$PWD/target/release/cri-bench"
