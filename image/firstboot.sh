#!/bin/sh
# First boot: create the users, the data dir and keys, and show the CA line for targets.
set -eu
if command -v systemd-sysusers >/dev/null 2>&1 && [ -f /usr/lib/sysusers.d/ephyr.conf ]; then
  systemd-sysusers /usr/lib/sysusers.d/ephyr.conf
else
  id ephyr >/dev/null 2>&1 || useradd --system --home-dir /var/lib/ephyr --shell /usr/sbin/nologin ephyr
  id ephyr-signer >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin ephyr-signer
fi
# A policy with one console operator and one agent, their credentials shown once (here, on the
# console) and kept nowhere: only their hashes are in the policy. An existing policy is kept.
if [ ! -e /etc/ephyr/policy.yaml ]; then
  install -d -m 0755 /etc/ephyr
  op=$(/usr/local/bin/ephyr operator add admin --role admin --generate)
  password=$(printf '%s\n' "$op" | sed -n '3s/^ *//p')
  password_hash=$(printf '%s\n' "$op" | sed -n 's/^ *password_hash: //p')
  agent=$(/usr/local/bin/ephyr keygen agent agent --json)
  api_key=$(printf '%s' "$agent" | sed -n 's/.*"api_key":"\([^"]*\)".*/\1/p')
  api_key_hash=$(printf '%s' "$agent" | sed -n 's/.*"api_key_hash":"\([^"]*\)".*/\1/p')
  cat > /etc/ephyr/policy.yaml.new <<EOF
# Written at first boot. Add targets, roles and grants (docs/policy.md), check with
# \`ephyr policy check\`, then \`systemctl reload ephyr\`.
version: 1
operators:
  admin: { role: admin, password_hash: $password_hash }
roles: {}
targets: {}
agents:
  agent:
    api_key_hash: "$api_key_hash"
EOF
  chgrp ephyr /etc/ephyr/policy.yaml.new
  chmod 0640 /etc/ephyr/policy.yaml.new
  mv /etc/ephyr/policy.yaml.new /etc/ephyr/policy.yaml
  echo "ephyr: first boot credentials (shown once, stored nowhere; write them down now):"
  echo "ephyr:   console operator: admin  password: $password"
  echo "ephyr:   MCP agent \"agent\" API key: $api_key"
fi
/usr/local/bin/ephyr init --data-dir /var/lib/ephyr --config-dir /etc/ephyr > /var/lib/ephyr/ca_key.pub.txt
echo "ephyr: CA public key for TrustedUserCAKeys on your targets:"
cat /var/lib/ephyr/ca_key.pub.txt
/usr/local/bin/ephyr doctor --offline --data-dir /var/lib/ephyr --config /etc/ephyr/policy.yaml || true
