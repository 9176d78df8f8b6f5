#!/usr/bin/env bash
# make container-bench: container start latency inside a pod VM (hyperstart, through hyper-vmm)
# against `runc run` of the same rootfs, both in ONE boot of the KVM test VM; plus the agent's
# RSS with 10 idle containers. Last line:
#   container_start_ms hyperstart=<median> runc=<median> ratio=<h/r> agent_rss_kib_10_idle=<n>
set -euo pipefail
cd "$(dirname "$0")/.."

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]; }
if ! installed runc; then
    sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q --no-install-recommends runc >/dev/null ||
        { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q --no-install-recommends runc >/dev/null; }
fi

kernel=$(hack/build-guest-kernel.sh | tail -n 1)
initrd=$(hack/build-initrd.sh | tail -n 1)
vmm=$(hack/build-vmm.sh | tail -n 1)
cargo build --release -q -p e2e --bin container-bench
bin=$(pwd)/target/release/container-bench
export HYPERNETES_KERNEL="$kernel" HYPERNETES_INITRD="$initrd" HYPERNETES_VMM="$vmm"
exec hack/kvm-vm --timeout 1500 --hang-timeout 180 -- "$bin"
