#!/bin/sh
# First boot: create the users, the data dir and keys, and show the CA line for targets.
set -eu
if command -v systemd-sysusers >/dev/null 2>&1 && [ -f /usr/lib/sysusers.d/ephyr.conf ]; then
  systemd-sysusers /usr/lib/sysusers.d/ephyr.conf
else
  id ephyr >/dev/null 2>&1 || useradd --system --home-dir /var/lib/ephyr --shell /usr/sbin/nologin ephyr
  id ephyr-signer >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin ephyr-signer
fi
/usr/local/bin/ephyr init --data-dir /var/lib/ephyr --config-dir /etc/ephyr > /var/lib/ephyr/ca_key.pub.txt
echo "ephyr: CA public key for TrustedUserCAKeys on your targets:"
cat /var/lib/ephyr/ca_key.pub.txt
/usr/local/bin/ephyr doctor --data-dir /var/lib/ephyr --config /etc/ephyr/policy.yaml || true
