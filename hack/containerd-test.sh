#!/usr/bin/env bash
# A private containerd (Debian's containerd + runc) as the reference CRI implementation, for tests and
# benchmarks that compare hyperctl's view of hyperd with a stock runtime. Works offline: the sandbox ("pause")
# image and a busybox image are built locally from Debian's busybox-static and imported with `ctr`.
#
#   hack/containerd-test.sh [start] DIR     start containerd with everything under DIR (created if missing):
#                                           DIR/containerd.sock (CRI + containerd API), DIR/containerd.pid,
#                                           DIR/containerd.log, DIR/config.toml, DIR/{root,state,runc,cni}/;
#                                           imports the pause and busybox images; returns once CRI answers
#   hack/containerd-test.sh stop DIR        kill every container of that containerd, containerd and its shims,
#                                           unmount what is left under DIR (rootfs, netns), delete the bridge
#                                           and DIR itself
#   hack/containerd-test.sh restart DIR     stop containerd (SIGTERM) and start it again with the same configuration;
#                                           containers and their shims keep running
#   hack/containerd-test.sh image KIND OUT  write a docker-archive tarball (importable with
#                                           `ctr -n k8s.io images import OUT`); KIND is busybox
#                                           (docker.io/library/busybox:latest, CMD sh) or pause
#                                           (localhost/hypernetes/pause:busybox, sleeps forever)
#   hack/containerd-test.sh import DIR KIND import one of those images into the containerd under DIR
#
# Pods get a bridge network: cni-ctrd0, 10.99.0.0/24 (host-local IPAM with its state under DIR; no NAT and
# no iptables rules; the bridge plugin does turn on net.ipv4.ip_forward). Two instances at once need their
# own: set CONTAINERD_TEST_BRIDGE and CONTAINERD_TEST_SUBNET when starting the second. Cgroups: cgroupfs (SystemdCgroup =
# false), so cgroup v1, hybrid and v2 hosts all work. Needs root.
#
# The hyper runtime (optional): with CONTAINERD_TEST_HYPER_SHIM=/path/to/containerd-shim-hyper-v1 at start, the
# CRI plugin also gets the runtime handler `hyper` (runtime_type io.containerd.hyper.v1) and `ctr run --runtime
# io.containerd.hyper.v1` works. The shim is linked into DIR/bin, which goes first on containerd's PATH; its
# configuration is DIR/hyper-shim.toml (HYPER_SHIM_CONFIG in containerd's environment): the VMM, kernel and initrd
# from HYPERNETES_VMM, HYPERNETES_KERNEL and HYPERNETES_INITRD, pod state under DIR/hs, VMM logs and consoles
# under DIR/hs-log, rootfs disks under DIR/hs-disks. `stop` also kills the hyper-vmm processes of those pods.
set -euo pipefail

PROG=containerd-test.sh
die() { echo "$PROG: error: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

PACKAGES=(containerd runc containernetworking-plugins busybox-static iproute2 util-linux)
BUSYBOX_IMAGE=docker.io/library/busybox:latest
PAUSE_IMAGE=localhost/hypernetes/pause:busybox
BRIDGE=${CONTAINERD_TEST_BRIDGE:-cni-ctrd0}
SUBNET=${CONTAINERD_TEST_SUBNET:-10.99.0.0/24}
CNI_BIN=/usr/lib/cni
HYPER_SHIM=${CONTAINERD_TEST_HYPER_SHIM:-}

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]; }

install_missing() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "not root and no sudo: cannot install ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        { "${sudo[@]}" apt-get update -q >/dev/null && "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
    note "installed ${missing[*]}"
}

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# build_image KIND OUT: a one-layer docker-archive image whose rootfs is busybox-static with all its applets.
build_image() {
    local kind=$1 out=$2 name config_extra
    case $kind in
    busybox)
        name=$BUSYBOX_IMAGE
        config_extra='"Cmd":["sh"]'
        ;;
    pause)
        name=$PAUSE_IMAGE
        # A sandbox container only has to exist and hold the namespaces; containerd stops it with SIGKILL.
        config_extra='"Entrypoint":["/bin/sleep","2147483647"]'
        ;;
    *) die "unknown image kind '$kind' (busybox or pause)" ;;
    esac
    local busybox
    busybox=$(command -v busybox || true)
    [[ -n $busybox ]] || die "busybox not found (apt-get install busybox-static)"
    # Debian's busybox package is dynamically linked: only a static one runs in an empty rootfs.
    if ldd "$busybox" >/dev/null 2>&1; then
        die "$busybox is not statically linked (install busybox-static)"
    fi

    local work
    work=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: work is local
    trap "rm -rf '$work'" RETURN
    local root=$work/rootfs
    mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,var/run,run} "$work/image"
    chmod 1777 "$root/tmp"
    cp "$busybox" "$root/bin/busybox"
    local applet
    for applet in $("$busybox" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

    tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$root" -cf "$work/layer.tar" .
    local diff_id
    diff_id=$(sha256 "$work/layer.tar")
    mkdir -p "$work/image/$diff_id"
    mv "$work/layer.tar" "$work/image/$diff_id/layer.tar"
    cat >"$work/config.json" <<EOF
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],${config_extra}},"rootfs":{"type":"layers","diff_ids":["sha256:${diff_id}"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"hack/containerd-test.sh: busybox-static"}]}
EOF
    local config_id
    config_id=$(sha256 "$work/config.json")
    mv "$work/config.json" "$work/image/$config_id.json"
    cat >"$work/image/manifest.json" <<EOF
[{"Config":"${config_id}.json","RepoTags":["${name}"],"Layers":["${diff_id}/layer.tar"]}]
EOF
    tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$work/image" -cf "$out" .
}

ctr_() { ctr --address "$DIR/containerd.sock" -n k8s.io "$@"; }

import_image() {
    local kind=$1 tarball
    tarball=$(mktemp --suffix=.tar)
    build_image "$kind" "$tarball"
    ctr_ images import --no-unpack=false "$tarball" >/dev/null 2>"$DIR/import.err" ||
        { cat "$DIR/import.err" >&2; rm -f "$tarball"; die "ctr images import ($kind) failed"; }
    rm -f "$tarball"
}

write_config() {
    mkdir -p "$DIR"/{root,state,runc,opt,cni/net.d,cni/ipam}
    cat >"$DIR/cni/net.d/10-ctrd.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ctrd-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "${DIR}/cni/ipam",
        "ranges": [[{ "subnet": "${SUBNET}" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
    # containerd brings up lo itself (with this same plugin); the file is for CNI tools that expect it.
    cat >"$DIR/cni/net.d/99-loopback.conf" <<EOF
{ "cniVersion": "0.4.0", "name": "lo", "type": "loopback" }
EOF
    cat >"$DIR/config.toml" <<EOF
version = 2
root = "${DIR}/root"
state = "${DIR}/state"
disabled_plugins = []

[grpc]
  address = "${DIR}/containerd.sock"

[ttrpc]
  address = "${DIR}/containerd.sock.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "${DIR}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "${PAUSE_IMAGE}"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "${DIR}/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "${CNI_BIN}"
      conf_dir = "${DIR}/cni/net.d"
      max_conf_num = 1
EOF
    [[ -z $HYPER_SHIM ]] || write_hyper_config
}

# The hyper runtime: the shim on containerd's PATH, its configuration, the CRI runtime handler `hyper`.
write_hyper_config() {
    [[ -x $HYPER_SHIM ]] || die "CONTAINERD_TEST_HYPER_SHIM=$HYPER_SHIM is not an executable"
    local var
    for var in HYPERNETES_VMM HYPERNETES_KERNEL HYPERNETES_INITRD; do
        [[ -n ${!var:-} && -f ${!var} ]] || die "the hyper runtime needs $var (a file), got '${!var:-}'"
    done
    mkdir -p "$DIR/bin"
    ln -sf "$(realpath "$HYPER_SHIM")" "$DIR/bin/containerd-shim-hyper-v1"
    cat >"$DIR/hyper-shim.toml" <<EOF
vmm = "${HYPERNETES_VMM}"
kernel = "${HYPERNETES_KERNEL}"
initrd = "${HYPERNETES_INITRD}"
state_dir = "${DIR}/hs"
log_dir = "${DIR}/hs-log"
disk_cache = "${DIR}/hs-disks"
EOF
    # Continues the CRI runtimes table written above.
    cat >>"$DIR/config.toml" <<EOF
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hyper]
        runtime_type = "io.containerd.hyper.v1"
EOF
}

alive() { [[ -f $DIR/containerd.pid ]] && kill -0 "$(cat "$DIR/containerd.pid")" 2>/dev/null; }

# containerd itself, with the configuration under DIR; returns once it answers.
launch() {
    rm -f "$DIR/containerd.sock" "$DIR/containerd.sock.ttrpc"
    # setsid: containerd and the shims it starts leave our process group, so a ^C in a test does not kill
    # them before the stop path runs.
    local env=()
    [[ ! -f $DIR/hyper-shim.toml ]] || env=(env "PATH=$DIR/bin:$PATH" "HYPER_SHIM_CONFIG=$DIR/hyper-shim.toml")
    setsid "${env[@]}" containerd --config "$DIR/config.toml" </dev/null >>"$DIR/containerd.log" 2>&1 &
    echo $! >"$DIR/containerd.pid"
    local i
    for ((i = 0; i < 300; i++)); do
        alive || { tail -n 30 "$DIR/containerd.log" >&2; die "containerd exited during start (log: $DIR/containerd.log)"; }
        [[ -S $DIR/containerd.sock ]] && ctr --address "$DIR/containerd.sock" version >/dev/null 2>&1 && break
        sleep 0.1
    done
    ((i < 300)) || die "containerd did not answer within 30 s (log: $DIR/containerd.log)"
}

# containerd stopped with SIGTERM and started again; containers and shims keep running.
restart() {
    DIR=$(cd "$DIR" && pwd)
    alive || die "no containerd runs for $DIR"
    local pid i
    pid=$(cat "$DIR/containerd.pid")
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && die "containerd (pid $pid) did not stop within 10 s"
    launch
    note "containerd restarted (pid $(cat "$DIR/containerd.pid"))"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "containerd needs root"
    install_missing
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    alive && die "a containerd already runs for $DIR (pid $(cat "$DIR/containerd.pid")); '$0 stop $DIR' first"
    ((${#DIR} + 20 < 108)) || die "DIR is too long for a Unix socket path: $DIR"
    write_config
    echo "$BRIDGE" >"$DIR/bridge"
    : >"$DIR/containerd.log"
    launch
    import_image pause
    import_image busybox
    note "containerd (pid $(cat "$DIR/containerd.pid")) listening on unix://$DIR/containerd.sock"
}

# pids of processes whose command line has our containerd address (the shims)
shim_pids() {
    local p cmdline
    for p in /proc/[0-9]*; do
        cmdline=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
        [[ $cmdline == *containerd-shim*" $DIR/containerd.sock "* ]] && echo "${p#/proc/}"
    done
    return 0
}

# pids of hyper-vmm processes whose configuration is under DIR/hs (the hyper runtime's pods)
hyper_vmm_pids() {
    local p cmdline
    [[ -d $DIR/hs ]] || return 0
    for p in /proc/[0-9]*; do
        cmdline=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
        [[ $cmdline == *hyper-vmm*" $DIR/hs/"* ]] && echo "${p#/proc/}"
    done
    return 0
}

stop() {
    [[ -d $DIR ]] || { note "$DIR does not exist: nothing to stop"; return 0; }
    DIR=$(cd "$DIR" && pwd)
    # 1. the containers: runc's own state under DIR/runc knows them all, with or without containerd
    local ns id
    for ns in "$DIR"/runc/*/; do
        [[ -d $ns ]] || continue
        for id in $(runc --root "$ns" list -q 2>/dev/null); do
            runc --root "$ns" delete --force "$id" >/dev/null 2>&1 || true
        done
    done
    # 2. containerd itself
    if alive; then
        local pid i
        pid=$(cat "$DIR/containerd.pid")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    # 3. its shims (they outlive containerd by design), and the VMMs of hyper pods (they outlive their shim)
    local s
    for s in $(shim_pids) $(hyper_vmm_pids); do
        kill -KILL "$s" 2>/dev/null || true
    done
    # 4. mounts left under DIR: container rootfs overlays, shm, network namespaces; deepest first
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
    # 5. the bridge this instance used
    local bridge=$BRIDGE
    [[ -f $DIR/bridge ]] && bridge=$(cat "$DIR/bridge")
    if [[ -n $bridge ]] && ip link show "$bridge" >/dev/null 2>&1; then
        ip link del "$bridge" 2>/dev/null || true
    fi
    # 6. the directory (never crossing into a mount that is still there)
    rm -rf --one-file-system "$DIR" 2>/dev/null || note "could not remove all of $DIR"
    return 0
}

cmd=${1:-}
case $cmd in
stop)
    [[ $# -eq 2 ]] || die "usage: $0 stop DIR"
    DIR=$2
    stop
    ;;
image)
    [[ $# -eq 3 ]] || die "usage: $0 image busybox|pause OUT.tar"
    build_image "$2" "$3"
    ;;
restart)
    [[ $# -eq 2 ]] || die "usage: $0 restart DIR"
    DIR=$2
    restart
    ;;
import)
    [[ $# -eq 3 ]] || die "usage: $0 import DIR busybox|pause"
    DIR=$(cd "$2" && pwd)
    import_image "$3"
    ;;
start)
    [[ $# -eq 2 ]] || die "usage: $0 start DIR"
    DIR=$2
    start
    ;;
"" | -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    [[ -n $cmd ]] || exit 2
    ;;
*)
    [[ $# -eq 1 ]] || die "usage: $0 [start] DIR | stop DIR | restart DIR | image KIND OUT | import DIR KIND"
    DIR=$1
    start
    ;;
esac
