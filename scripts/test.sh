#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine with Rust installed (run as root: it
# installs packages, creates test users, and the tests exercise the root-started privilege drop).
#
#   ./scripts/test.sh            everything: deps, fmt, clippy, cargo deny (bans, licences,
#                                sources), unit + integration tests, the instruction-count gate,
#                                aarch64 cross build with the pure tests under qemu
#   EPHYR_SKIP_AARCH64=1 ...     skip the aarch64 step (saves ~3.5 min)
#   EPHYR_SKIP_IMAGE=1 ...       skip building and booting the appliance image (saves ~6 min)
#
# Installs what the tests need: apt (openssh-server, curl, setpriv, chromium, ...), Python packages
# (tests/requirements.txt) and npm packages (tests/peers/package.json), all from the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh must run as root (it installs packages and tests the privilege drop)" >&2
  exit 1
fi

step "system packages"
apt_pkgs=(openssh-server openssh-client curl util-linux file procps python3 iproute2 prometheus valgrind chromium
  mmdebstrap qemu-system-x86 e2fsprogs nftables dosfstools mtools fdisk ovmf faketime strace)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  # policy-rc.d keeps package scripts from starting system services (sshd, prometheus) here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  # qemu-system-x86 comes from bookworm: a newer qemu-utils (backports) would block it.
  pin=()
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] && dpkg -s qemu-utils >/dev/null 2>&1; then
    pin=(--allow-downgrades qemu-utils/bookworm)
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" "${pin[@]}" \
    > /tmp/ephyr-apt.log 2>&1 || { cat /tmp/ephyr-apt.log; rm -f /usr/sbin/policy-rc.d; exit 1; }
  rm -f /usr/sbin/policy-rc.d
fi
mkdir -p /run/sshd

if [ -f tests/requirements.txt ]; then
  step "python packages"
  python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
if [ -f tests/peers/package.json ]; then
  step "npm packages"
  (cd tests/peers && npm ci --no-audit --no-fund --loglevel=error)
  # The conformance prerelease: its authorization-server scenarios (tests/oauth.rs).
  (cd tests/peers-next && npm ci --no-audit --no-fund --loglevel=error)
fi

if ! cargo deny --version 2>/dev/null | grep -q "^cargo-deny 0.20.2"; then
  step "cargo-deny (crates.io)"
  cargo install --locked --quiet cargo-deny@0.20.2
fi

step "cargo fmt --check"
cargo fmt --check
step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
step "cargo deny (bans, licences, sources; deny.toml)"
# Every locked package, also those only other platforms build (cargo deny reads them offline).
cargo fetch --locked --quiet
cargo deny --locked --offline check bans licenses sources
step "cargo test"
cargo test --locked
step "instruction-count gate (scripts/perf/icount.py, benches/icount-baseline.json)"
python3 scripts/perf/icount.py --check
if [ "${EPHYR_SKIP_AARCH64:-0}" != 1 ]; then
  step "aarch64 cross build + pure tests under qemu"
  ./scripts/build-aarch64.sh
  step "release tarball recipe (scripts/release.sh --check aarch64: packed twice, identical)"
  ./scripts/release.sh --check aarch64
fi
if [ "${EPHYR_SKIP_IMAGE:-0}" != 1 ]; then
  step "appliance image: static build, image/build.sh, boot under qemu (tests/image.py)"
  ./scripts/build-static.sh
  image/build.sh --bin target/x86_64-unknown-linux-gnu/release/ephyr --out target/image-x86_64
  python3 tests/image.py target/image-x86_64
fi
step "done"
