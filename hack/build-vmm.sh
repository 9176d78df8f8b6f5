#!/usr/bin/env bash
# Build hyper-vmm as a static musl binary and print its path (last line).
# Static: no dynamic loader or relocation work at exec, which measured ~half the VMM's
# exec-to-main time in the nested test environment (part of every pod's boot).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-musl
rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >/dev/null
cargo build --release --locked -p vmm --bin hyper-vmm --target "$target" >&2
echo "$PWD/target/$target/release/hyper-vmm"
