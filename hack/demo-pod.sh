#!/usr/bin/env bash
# The main job's second half: on a machine whose /dev/kvm boots guests (the KVM test VM here, or
# a real host), start hyperd with a private configuration and the built-in busybox image, and run
#   hyperctl run --rm busybox echo hello from a VM
# as kubelet would run a pod: a pod VM with its own kernel, a CNI bridge network, a container.
# Everything it creates (hyperd, the pod VM, the bridge, the netns, files) is removed on exit.
#
#   hack/demo-pod.sh HYPERD HYPERCTL VMM KERNEL INITRD BUSYBOX_ARCHIVE
set -euo pipefail
[ $# -eq 6 ] || { echo "usage: $0 HYPERD HYPERCTL VMM KERNEL INITRD BUSYBOX_ARCHIVE" >&2; exit 2; }
hyperd=$1 hyperctl=$2 vmm=$3 kernel=$4 initrd=$5 archive=$6
bridge=hyp-demo0

# Short: VMM socket paths under it must fit in sockaddr_un.
dir=$(mktemp -d /tmp/hd.XXXXXX)
pid=
cleanup() {
    rc=$?
    if [ -n "$pid" ]; then
        # Pods of a failed run first (a --rm run removes its own), then hyperd.
        "$hyperctl" --endpoint "unix://$dir/hyperd.sock" rm -f $("$hyperctl" --endpoint "unix://$dir/hyperd.sock" -o json pods 2>/dev/null |
            sed -n 's/.*"id": *"\([0-9a-f]\{64\}\)".*/\1/p') >/dev/null 2>&1 || true
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$dir/hyperd.log" ]; then
        echo "--- hyperd log ---" >&2
        tail -n 40 "$dir/hyperd.log" >&2
    fi
    ip link del "$bridge" 2>/dev/null || true
    for m in $(awk -v d="$dir" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$dir"
    exit "$rc"
}
trap cleanup EXIT

mkdir -p "$dir/cni"
cat >"$dir/cni/10-demo.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "hyp-demo",
  "plugins": [
    { "type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true,
      "ipam": { "type": "host-local", "dataDir": "$dir/ipam",
                "ranges": [[{ "subnet": "10.88.77.0/24" }]], "routes": [{ "dst": "0.0.0.0/0" }] } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON
cat >"$dir/config.toml" <<TOML
socket = "$dir/hyperd.sock"
state_dir = "$dir/s"
image_dir = "$dir/images"
vm_log_dir = "$dir/vm"
vmm = "$vmm"
kernel = "$kernel"
initrd = "$initrd"
boot_timeout_secs = 180
agent_call_timeout_secs = 120
cni_conf_dir = "$dir/cni"
cni_bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
netns_dir = "$dir/netns"
network_state_dir = "$dir/net"

[[preload_images]]
name = "docker.io/library/busybox:latest"
archive = "$archive"
TOML

RUST_LOG=info "$hyperd" --config "$dir/config.toml" >"$dir/hyperd.log" 2>&1 &
pid=$!
export HYPERCTL_ENDPOINT="unix://$dir/hyperd.sock"
for _ in $(seq 1 600); do
    "$hyperctl" info >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "hyperd exited" >&2; exit 1; }
    sleep 0.1
done
"$hyperctl" info
"$hyperctl" images
echo "\$ hyperctl run --rm busybox echo hello from a VM"
start=$(date +%s%N)
"$hyperctl" --timeout 300s run --rm --log-root "$dir/logs" busybox echo hello from a VM
echo "demo: pod VM created, ran and removed in $(( ($(date +%s%N) - start) / 1000000 )) ms"
echo "\$ hyperctl run --rm busybox uname -r   # the pod's own kernel; this machine runs $(uname -r)"
"$hyperctl" --timeout 300s run --rm --log-root "$dir/logs" busybox uname -r
"$hyperctl" pods
