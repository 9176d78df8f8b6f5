# Hypernetes build and test entry points. Every target installs or builds what it needs.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
BUILD ?= $(CURDIR)/build
export HYPERNETES_BUILD := $(BUILD)

.PHONY: all setup build guest-kernel guest-initrd guest lint unit e2e test demo boot-bench image-bench container-bench cri-bench shim-bench install-node clean

all: build

setup:
	hack/setup.sh

build: guest
	hack/build-vmm.sh

guest-kernel:
	@hack/build-guest-kernel.sh

guest-initrd:
	@hack/build-initrd.sh

# Kernel + initramfs paths, resolved once (the kernel path is keyed by the config hash).
guest: guest-kernel guest-initrd

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit tests, then the CRI scenario of e2e/tests/hyperd.rs against containerd + runc: the
# reference for hyperd's run of the same scenario in `make e2e`. It needs root but no KVM and
# runs on the host (the test's comment says why not in the test VM).
unit:
	$(CARGO) test --workspace
	$(CARGO) test -p e2e --test hyperd -- --ignored --exact containerd_cri_reference

# End-to-end tests: boot real guests. Runs the whole e2e suite in ONE KVM test VM boot.
e2e: guest
	hack/run-e2e.sh

# The README's test command: everything CI runs.
test: setup lint unit e2e

# The main job: a pod VM, offline, on the built-in guest.
demo: setup guest
	hack/demo.sh

boot-bench: setup guest
	hack/boot-bench.sh

# Image pull + unpack + rootfs disk against skopeo + umoci, on a local registry.
image-bench:
	hack/image-bench.sh

# Container start latency in a pod VM (hyperstart) against `runc run` on the host, same run.
container-bench: setup guest
	hack/container-bench.sh

# Pod start through CRI: hyperd against containerd + runc (hyperctl bench), same KVM test-VM boot;
# plus host memory per idle pod. CRI_BENCH_PODS (20), CRI_BENCH_PARALLEL (4), CRI_BENCH_IDLE (5).
cri-bench: setup guest
	hack/cri-bench.sh

# Pod start through containerd's CRI: runtime handler hyper (containerd-shim-hyper-v1) against
# runc, same containerd, same KVM test-VM boot; plus the shim's and VMM's memory per idle pod.
shim-bench: setup guest
	CRI_BENCH_MODE=shim hack/cri-bench.sh

# Install the shim, the VMM, the guest kernel and initramfs on this node and add runtime
# handler hyper to containerd's configuration (hack/install-node.sh --help).
install-node:
	hack/install-node.sh

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
