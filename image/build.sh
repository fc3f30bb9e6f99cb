#!/usr/bin/env bash
# Builds the appliance from Debian packages only (the Debian archive; nothing else is downloaded):
# Debian 12 with systemd, the kernel, DHCP on the first network interface (systemd-networkd), the
# static ephyr binary and its hardened units. Nothing but ephyr listens (no sshd, no resolver
# stub: resolved is not installed).
#
#   image/build.sh --bin PATH [--arch x86_64|aarch64] [--out DIR] [--size 1G]
#
# Output in DIR (default dist/image-ARCH): rootfs.ext4 (the root file system, sparse), vmlinuz and
# initrd.img (the kernel and its initramfs, taken from the image), and cmdline (the kernel command
# line). Boot it under qemu with direct kernel boot (tests/image.py does) or write the file system
# to a partition of a disk whose boot loader loads that kernel (image/README.md).
#
# First boot (ephyr-firstboot.service) creates the users and keys and a policy with one operator
# and one agent, and prints their credentials once on the console (serial line).
set -euo pipefail
cd "$(dirname "$0")/.."

arch=x86_64 bin="" out="" size=1G
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) echo "usage: image/build.sh --bin PATH [--arch x86_64|aarch64] [--out DIR] [--size 1G]" >&2; exit 2 ;;
  esac
done
[ -n "$bin" ] && [ -x "$bin" ] || { echo "error: --bin PATH to a built static ephyr is required" >&2; exit 2; }
case "$arch" in
  x86_64) deb_arch=amd64 kernel=linux-image-amd64 console=ttyS0 ;;
  aarch64) deb_arch=arm64 kernel=linux-image-arm64 console=ttyAMA0 ;;
  *) echo "error: --arch is x86_64 or aarch64" >&2; exit 2 ;;
esac
out=${out:-dist/image-$arch}
mirror=${EPHYR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$out"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

# The root file system. `--mode=root`: we run as root and need no user namespace.
mmdebstrap --mode=root --variant=minbase --architectures="$deb_arch" \
  --include="systemd,systemd-sysv,udev,$kernel,initramfs-tools,kmod,iproute2,ca-certificates,nftables" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  bookworm "$root" "$mirror"

# ephyr, its units and first-boot script, the appliance's network and host name.
install -m 0755 "$bin" "$root/usr/local/bin/ephyr"
install -d -m 0755 "$root/usr/local/lib/ephyr" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
install -m 0755 image/firstboot.sh "$root/usr/local/lib/ephyr/firstboot.sh"
install -m 0644 image/sysusers.d/ephyr.conf "$root/usr/lib/sysusers.d/ephyr.conf"
install -m 0644 image/tmpfiles.d/ephyr.conf "$root/usr/lib/tmpfiles.d/ephyr.conf"
install -m 0644 image/systemd/ephyr.service image/systemd/ephyr-firstboot.service "$root/etc/systemd/system/"
install -d -m 0755 "$root/usr/share/doc/ephyr"
install -m 0644 README.md "$root/usr/share/doc/ephyr/README.md"
install -m 0644 image/README.md "$root/usr/share/doc/ephyr/APPLIANCE.md"
cat > "$root/etc/systemd/network/20-wired.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
echo ephyr > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tephyr\n' > "$root/etc/hosts"
echo "/dev/vda / ext4 defaults,noatime 0 1" > "$root/etc/fstab"
# No password for root and no getty logins over the network: the console stays for recovery.
chroot "$root" systemctl enable systemd-networkd.service ephyr-firstboot.service ephyr.service >/dev/null
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
rm -f "$root/etc/machine-id" && touch "$root/etc/machine-id"

cp -L "$root/vmlinuz" "$out/vmlinuz"
cp -L "$root/initrd.img" "$out/initrd.img"
echo "root=/dev/vda rw console=$console lsm=landlock,lockdown,yama,integrity,apparmor quiet" > "$out/cmdline"
rm -f "$out/rootfs.ext4"
mkfs.ext4 -q -F -L ephyr-root -d "$root" "$out/rootfs.ext4" "$size"
echo "$out/rootfs.ext4: $(du -h --apparent-size "$out/rootfs.ext4" | cut -f1) ($(du -h "$out/rootfs.ext4" | cut -f1) used)"
echo "kernel $(basename "$(readlink "$root/vmlinuz")"), $("$bin" --version 2>/dev/null || echo "ephyr (foreign arch)")"
