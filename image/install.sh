#!/bin/sh
# Installs (or upgrades: docs/upgrading.md) a built ephyr binary and the appliance units on a
# Debian-like system (run as root). Never touches /etc/ephyr or the data dir.
#   image/install.sh path/to/ephyr
set -eu
bin=${1:?usage: install.sh path/to/ephyr}
here=$(dirname "$0")
install -m 0755 "$bin" /usr/local/bin/ephyr
install -d -m 0755 /usr/local/lib/ephyr /usr/lib/sysusers.d /usr/lib/tmpfiles.d
install -m 0755 "$here/firstboot.sh" /usr/local/lib/ephyr/firstboot.sh
install -m 0644 "$here/sysusers.d/ephyr.conf" /usr/lib/sysusers.d/ephyr.conf
install -m 0644 "$here/tmpfiles.d/ephyr.conf" /usr/lib/tmpfiles.d/ephyr.conf
install -m 0644 "$here/systemd/ephyr.service" "$here/systemd/ephyr-firstboot.service" /etc/systemd/system/
systemctl daemon-reload
systemctl enable ephyr-firstboot.service ephyr.service
echo "installed; start with: systemctl start ephyr"
