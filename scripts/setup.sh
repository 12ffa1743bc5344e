#!/usr/bin/env bash
# Sets up a fresh machine for dnsmirror: system tools used by the tests and benchmarks, and a
# virtualenv with the package. Idempotent; fast when everything is already there.
#   scripts/setup.sh          # runtime + test tools
#   scripts/setup.sh bench    # also the benchmark peers (dnsperf, unbound, nginx)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# command -> Debian package that provides it
declare -A TOOLS=(
  [dig]=bind9-dnsutils
  [unbound]=unbound
  [openssl]=openssl
  [ip]=iproute2
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [containerd]=containerd
  [htpasswd]=apache2-utils
  [curl]=curl
  [tinyproxy]=tinyproxy
  # the runtime tests: every engine a node may pull with, and a base image built from packages
  [dockerd]=docker.io
  [podman]=podman
  [buildah]=buildah
  [mmdebstrap]=mmdebstrap
)
if [ "${1:-}" = bench ]; then
  TOOLS[dnsperf]=dnsperf
  TOOLS[nginx]=nginx-light
fi

missing=()
for tool in "${!TOOLS[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("${TOOLS[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: missing tools (${missing[*]}); install them with your package manager" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  # policy-rc.d keeps Debian's postinst from starting system copies of unbound, nginx, tinyproxy, the registry,
  # dockerd and containerd
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log="$VENV/setup.log"
  # pip is chatty; keep its output for when it fails
  if ! "$VENV/bin/pip" install -e '.[test]' >"$log" 2>&1; then
    tail -30 "$log" >&2
    exit 1
  fi
  touch "$stamp"
fi
