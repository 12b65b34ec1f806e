#!/usr/bin/env bash
# Install Postfix (smtp-sink, smtp-source, a relay to compare with) and OpenDKIM for the
# benchmark. Debian/Ubuntu, as root. Postfix is preseeded with "No configuration" so the
# package does not write a system main.cf; the system services are stopped and disabled
# right after install: the benchmark runs its own throwaway instances in temp directories.
#   bash bench/install-postfix.sh
set -euo pipefail

if [[ $(id -u) != 0 ]]; then
  echo "install-postfix.sh: run as root (apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
debconf-set-selections <<'SEL'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string bench.invalid
SEL
apt-get update -qq
# policy-rc.d answering 101 keeps the maintainer scripts from starting the services.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
trap '[[ $created_policy == 1 ]] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends postfix opendkim opendkim-tools >/dev/null

# Leave no system instance running (the bench starts its own on loopback ports).
for svc in postfix opendkim; do
  if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done

for tool in /usr/sbin/postfix /usr/sbin/smtp-sink /usr/sbin/smtp-source /usr/sbin/opendkim; do
  [[ -x $tool ]] || { echo "install-postfix.sh: $tool missing after install" >&2; exit 1; }
done
echo "installed: $(dpkg-query -W -f='postfix ${Version}, ' postfix)$(dpkg-query -W -f='opendkim ${Version}' opendkim)"
