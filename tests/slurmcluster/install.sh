#!/usr/bin/env bash
# Install what the Slurm integration tests start: Slurm 22.05 (Debian 12), munge, MariaDB for
# slurmdbd (sacct), slurmrestd with JWT, and an OpenSSH server; also Graphviz, whose `dot` the
# lineage test uses for SVG, and Chromium for the dashboard's browser tests. Idempotent; needs root.
set -euo pipefail
PKGS=(slurm-wlm slurmctld slurmd slurm-client slurmdbd slurmrestd slurm-wlm-jwt-plugin
      munge mariadb-server openssh-server util-linux graphviz
      # the dashboard's browser tests (Playwright drives it by its path, /usr/bin/chromium)
      chromium)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: need root to install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d 101: the packages' own services stay stopped; the tests start their own daemons.
had_policy=0
[ -e /usr/sbin/policy-rc.d ] && had_policy=1
if [ "$had_policy" -eq 0 ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
if [ "$had_policy" -eq 0 ]; then
  rm -f /usr/sbin/policy-rc.d
fi
