#!/usr/bin/env bash
# Builds the appliance from Debian packages only (the Debian archive; nothing else is downloaded):
# Debian 12 with systemd, the kernel, DHCP on the first network interface (systemd-networkd), the
# static ephyr binary and its hardened units. Nothing but ephyr listens (no sshd, no resolver
# stub: resolved is not installed).
#
#   image/build.sh --bin PATH [--arch x86_64|aarch64] [--out DIR] [--size 1G]
#
# Output in DIR (default dist/image-ARCH): disk.img, a whole disk (sparse) to write to an SD card,
# a USB stick or a VM's disk: an MBR partition table, partition 1 a FAT32 boot partition
# (EPHYR-BOOT: systemd-boot as the removable-media UEFI loader, the kernel and its initramfs; on
# aarch64 also the Raspberry Pi firmware, device trees, config.txt and cmdline.txt), partition 2
# the ext4 root file system (ephyr-root, --size). Under qemu it boots with the UEFI firmware
# (tests/image.py does).
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
  x86_64) deb_arch=amd64 kernel=linux-image-amd64 console=ttyS0 efi=x64 extra="" ;;
  aarch64) deb_arch=arm64 kernel=linux-image-arm64 console=ttyAMA0 efi=aa64 extra=",raspi-firmware" ;;
  *) echo "error: --arch is x86_64 or aarch64" >&2; exit 2 ;;
esac
out=${out:-dist/image-$arch}
mirror=${EPHYR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$out"
root=$(mktemp -d) boot=$(mktemp -d) tmpd=$(mktemp -d)
trap 'rm -rf "$root" "$boot" "$tmpd"' EXIT
trap 'exit 130' INT TERM
# The root file system. `--mode=root`: we run as root and need no user namespace.
mmdebstrap --mode=root --variant=minbase --architectures="$deb_arch" --components=main,non-free-firmware \
  --include="systemd,systemd-sysv,udev,$kernel,initramfs-tools,kmod,iproute2,ca-certificates,nftables,systemd-boot-efi$extra" \
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
echo "LABEL=ephyr-root / ext4 defaults,noatime 0 1" > "$root/etc/fstab"
# No password for root and no getty logins over the network: the console stays for recovery.
chroot "$root" systemctl enable systemd-networkd.service ephyr-firstboot.service ephyr.service >/dev/null
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true
rm -f "$root/etc/machine-id" && touch "$root/etc/machine-id"
# raspi-firmware's own hooks copied the kernel, initrd and device trees into the root file
# system's /boot/firmware; the boot partition gets them below, so the copies go.
rm -rf "${root:?}"/boot/firmware/*

# The boot partition: systemd-boot at the removable-media path, one entry, the kernel and initrd.
cmdline="root=LABEL=ephyr-root rw rootwait lsm=landlock,lockdown,yama,integrity,apparmor quiet"
mkdir -p "$boot/EFI/BOOT" "$boot/loader/entries"
cp "$root/usr/lib/systemd/boot/efi/systemd-boot$efi.efi" "$boot/EFI/BOOT/BOOT${efi^^}.EFI"
cp -L "$root/vmlinuz" "$boot/vmlinuz"
cp -L "$root/initrd.img" "$boot/initrd.img"
printf 'default ephyr.conf\ntimeout 0\n' > "$boot/loader/loader.conf"
printf 'title ephyr\nlinux /vmlinuz\ninitrd /initrd.img\noptions console=%s %s\n' "$console" "$cmdline" \
  > "$boot/loader/entries/ephyr.conf"
if [ "$arch" = aarch64 ]; then
  # A Raspberry Pi (3, 4, 5, Zero 2) boots from its own firmware, which reads this partition: the
  # firmware files from Debian's raspi-firmware package, the kernel's device trees, config.txt
  # (what that package's kernel hook writes to /boot/firmware on a Debian Pi, with our console).
  cp "$root"/usr/lib/raspi-firmware/* "$boot/"
  cp "$root"/usr/lib/linux-image-*/broadcom/bcm27*-rpi-*.dtb "$boot/"
  cat > "$boot/config.txt" <<'EOF'
# Raspberry Pi firmware settings for the ephyr appliance (Debian's upstream kernel).
arm_64bit=1
upstream_kernel=1
enable_uart=1
kernel=vmlinuz
initramfs initrd.img followkernel
EOF
  # The UART of a Pi 3/4 under the upstream kernel is ttyS1; the last console is where first boot
  # prints the credentials: the screen.
  echo "console=ttyS1,115200 console=tty0 $cmdline" > "$boot/cmdline.txt"
fi

# The disk: 1 MiB for the partition table, the boot partition, the root file system.
boot_mib=256
mkfs.vfat -F 32 -n EPHYR-BOOT -C "$tmpd/boot.img" $((boot_mib * 1024)) >/dev/null
(cd "$boot" && find . -mindepth 1 -type d | sort | sed 's|^\./|::/|' | xargs -r mmd -i "$tmpd/boot.img")
(cd "$boot" && find . -type f | sort | while read -r f; do mcopy -i "$tmpd/boot.img" "$f" "::/${f#./}"; done)
mkfs.ext4 -q -F -L ephyr-root -d "$root" "$tmpd/root.ext4" "$size"
root_mib=$(( $(stat -c %s "$tmpd/root.ext4") / 1048576 ))
rm -f "$out/disk.img"
truncate -s $((1 + boot_mib + root_mib))M "$out/disk.img"
sfdisk -q "$out/disk.img" <<EOF
label: dos
start=1MiB, size=${boot_mib}MiB, type=c, bootable
start=$((1 + boot_mib))MiB, size=${root_mib}MiB, type=83
EOF
dd if="$tmpd/boot.img" of="$out/disk.img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$tmpd/root.ext4" of="$out/disk.img" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
echo "$out/disk.img: $(du -h --apparent-size "$out/disk.img" | cut -f1) ($(du -h "$out/disk.img" | cut -f1) used)"
echo "kernel $(basename "$(readlink "$root/vmlinuz")"), $("$bin" --version 2>/dev/null || echo "ephyr (foreign arch)")"
