#!/usr/bin/env bash
# Release tarballs: dist/ephyr-<version>-<arch>-linux.tar.gz for x86_64 and aarch64, and
# dist/SHA256SUMS.
#
#   scripts/release.sh                 both architectures
#   scripts/release.sh x86_64          one (x86_64 | aarch64)
#   scripts/release.sh --pack-only     re-pack the binaries already built (the tarball half alone)
#   scripts/release.sh --check ARCH    pack ARCH's built binary twice, the second time with every
#                                      packed file's mtime changed, and compare (the test suite's
#                                      fast check of the recipe; it builds nothing)
#
# Each tarball holds the static binary, the systemd units, sysusers.d and tmpfiles.d entries, the
# first-boot and install scripts, the example policies, the docs, README.md and the licence, under
# one directory named like the tarball.
#
# Reproducible: building the same commit twice gives identical bytes.
#   * SOURCE_DATE_EPOCH is the commit's time (tar entry times; nothing else reads the clock);
#   * the binary: --remap-path-prefix for the checkout, ~/.cargo and the toolchain, so no
#     absolute build path ends up in panic messages or debug sections; LTO with one codegen unit
#     and a locked dependency set (Cargo.lock) leave no ordering to chance; the version string
#     carries the commit (EPHYR_COMMIT), not a date;
#   * the tar: entries sorted by name, owner and group 0, modes normalised, mtime pinned, no PAX
#     atime/ctime; gzip -n (no name, no time in the header).
# docs/PERFORMANCE.md ("Release") records a double build compared byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."

pack_only=false
check=false
arches=()
for a in "$@"; do
  case "$a" in
    --pack-only) pack_only=true ;;
    --check) check=true; pack_only=true ;;
    x86_64 | aarch64) arches+=("$a") ;;
    *) echo "usage: scripts/release.sh [--pack-only | --check] [x86_64] [aarch64]" >&2; exit 2 ;;
  esac
done
[ ${#arches[@]} -gt 0 ] || arches=(x86_64 aarch64)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo "${EPHYR_COMMIT:-unknown}")
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "warning: the checkout has uncommitted changes; the release names $commit but is not it" >&2
fi
export EPHYR_COMMIT=$commit
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
remap="--remap-path-prefix=$PWD=/ephyr --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"
remap+=" --remap-path-prefix=${RUSTUP_HOME:-$HOME/.rustup}=/rustup --remap-path-prefix=/usr/lib/rustlib=/rustlib"

binary() {
  case "$1" in
    x86_64) echo target/x86_64-unknown-linux-gnu/release/ephyr ;;
    aarch64) echo target-aarch64/aarch64-unknown-linux-gnu/release/ephyr ;;
  esac
}

if ! $pack_only; then
  for arch in "${arches[@]}"; do
    case "$arch" in
      x86_64) RUSTFLAGS="$remap" ./scripts/build-static.sh ;;
      aarch64) EPHYR_EXTRA_RUSTFLAGS="$remap" ./scripts/build-aarch64.sh --no-tests ;;
    esac
  done
fi

pack() { # OUT-DIR [SOURCE-DIR: where docs/, policies/, image/, README.md and LICENSE are]
  local out=$1 src=${2:-.}
  mkdir -p "$out"
  local stage
  stage=$(mktemp -d)
  for arch in "${arches[@]}"; do
    local bin name root
    bin=$(binary "$arch")
    [ -x "$bin" ] || { echo "error: $bin is missing (build it, or drop --pack-only)" >&2; rm -rf "$stage"; exit 1; }
    name="ephyr-$version-$arch-linux"
    root="$stage/$name"
    install -d "$root/bin" "$root/systemd" "$root/sysusers.d" "$root/tmpfiles.d" "$root/policies" "$root/docs"
    install -m 0755 "$bin" "$root/bin/ephyr"
    install -m 0644 "$src"/image/systemd/*.service "$root/systemd/"
    install -m 0644 "$src/image/sysusers.d/ephyr.conf" "$root/sysusers.d/"
    install -m 0644 "$src/image/tmpfiles.d/ephyr.conf" "$root/tmpfiles.d/"
    install -m 0755 "$src/image/firstboot.sh" "$src/image/install.sh" "$root/"
    install -m 0644 "$src"/policies/*.yaml "$root/policies/"
    cp -R "$src/docs/." "$root/docs/"
    install -m 0644 "$src/README.md" "$src/LICENSE" "$root/"
    install -m 0644 "$src/image/README.md" "$root/APPLIANCE.md"
    printf '%s\n' "ephyr $version ($commit) $arch-linux" > "$root/VERSION"
    chmod -R u+rwX,go+rX,go-w "$root"
    tar --sort=name --format=gnu --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
      -C "$stage" -cf - "$name" | gzip -n -9 > "$out/$name.tar.gz"
    echo "$out/$name.tar.gz: $(stat -c %s "$out/$name.tar.gz") bytes (binary $(stat -c %s "$bin") bytes)"
  done
  rm -rf "$stage"
  (cd "$out" && sha256sum ephyr-*-linux.tar.gz > SHA256SUMS)
}

if $check; then
  a=$(mktemp -d) b=$(mktemp -d) copy=$(mktemp -d)
  trap 'rm -rf "$a" "$b" "$copy"' EXIT
  pack "$a" > /dev/null
  # The same files again, copied now (new times) under another umask.
  (umask 0002 && cp -R docs policies image README.md LICENSE "$copy/")
  (umask 0002 && pack "$b" "$copy" > /dev/null)
  cmp "$a/SHA256SUMS" "$b/SHA256SUMS" || { echo "error: two packs of the same files differ" >&2; exit 1; }
  for arch in "${arches[@]}"; do
    listing=$(tar -tvzf "$a/ephyr-$version-$arch-linux.tar.gz")
    for want in bin/ephyr systemd/ephyr.service sysusers.d/ephyr.conf tmpfiles.d/ephyr.conf LICENSE policies/homelab.yaml docs/policy.md; do
      grep -q " ephyr-$version-$arch-linux/$want\$" <<< "$listing" || { echo "error: $want missing" >&2; exit 1; }
    done
    if grep -v " root/root \| 0/0 " <<< "$listing" | grep -q .; then
      echo "error: an entry is not owned by 0/0" >&2; exit 1
    fi
  done
  echo "release recipe: two packs identical ($(cut -c1-16 "$a/SHA256SUMS" | tr '\n' ' '))"
  exit 0
fi

pack dist
cat dist/SHA256SUMS
