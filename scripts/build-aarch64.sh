#!/usr/bin/env bash
# Cross-builds a static aarch64 ephyr with Debian's Rust toolchain and runs `ephyr --version` and
# the pure unit tests (token engine, protocols, policy, time) and the event loop's (epoll, eventfd,
# sockets, the signal pipe: the reactor is the same code on the appliance) under qemu-aarch64-static.
#
# The sandbox cannot be exercised under qemu-user (no Landlock, no seccomp there), so only the
# pure tests run here; the sandbox is tested natively on x86_64 and on real aarch64 hardware.
#   --no-tests   build only (scripts/release.sh); EPHYR_EXTRA_RUSTFLAGS adds to the flags.
set -euo pipefail
cd "$(dirname "$0")/.."
run_tests=true
[ "${1:-}" = "--no-tests" ] && run_tests=false

pkgs=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

target=aarch64-unknown-linux-gnu
# rustup's cargo in ~/.cargo/bin would shadow Debian's; use Debian's toolchain explicitly.
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export RUSTFLAGS="-C target-feature=+crt-static ${EPHYR_EXTRA_RUSTFLAGS:-}"
cargo=/usr/bin/cargo
"$RUSTC" --version

"$cargo" build --release --locked --target "$target" --target-dir target-aarch64 --bin ephyr
bin="target-aarch64/$target/release/ephyr"
file "$bin"
qemu-aarch64-static "$bin" --version
printf 'size: %s bytes\n' "$(stat -c %s "$bin")"

$run_tests || exit 0
# Pure unit tests (no sandbox, no processes) under emulation.
"$cargo" test --locked --target "$target" --target-dir target-aarch64 --lib -- \
  macaroon:: signer::protocol:: signer::custody:: time:: secret:: users:: broker::policy:: mcp:: \
  broker::reactor:: broker::deadline::
