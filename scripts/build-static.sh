#!/usr/bin/env bash
# Builds a statically linked x86_64 ephyr (static-pie, glibc +crt-static) and prints its size.
# Release profile: LTO, one codegen unit, panic=abort, stripped (Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" cargo build --release --locked --target "$target"
bin="target/$target/release/ephyr"
file "$bin"
case "$(ldd "$bin" 2>&1)" in
  *"statically linked"*|*"not a dynamic executable"*) ;;
  *) echo "error: $bin is dynamically linked" >&2; exit 1 ;;
esac
"$bin" --version
printf 'size: %s bytes (%s)\n' "$(stat -c %s "$bin")" "$(numfmt --to=iec-i --suffix=B "$(stat -c %s "$bin")")"
