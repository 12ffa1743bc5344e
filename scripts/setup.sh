#!/usr/bin/env bash
# Sets up a fresh machine for dnsmirror: system tools used by the tests and benchmarks, and a
# virtualenv with the package. Idempotent; fast when everything is already there.
#   scripts/setup.sh          # runtime + test tools
#   scripts/setup.sh test     # also the image test's offline inputs (a Debian root filesystem, wheels)
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
  [dnsmasq]=dnsmasq-base
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

# The image test's offline inputs (tests/test_image_e2e.py), made once and kept across runs: a Debian
# root filesystem with Python, pip and iproute2 (mmdebstrap, from the same package archive as above),
# and wheels of dnsmirror's dependencies and build backend. The test builds the Dockerfile on them in a
# namespace with no route anywhere. Best effort: without them that test is skipped with the reason.
IMAGE_CACHE=${DNSMIRROR_TEST_CACHE:-/var/cache/dnsmirror-test}
BASE_PACKAGES="python3,python3-pip,iproute2"
image_inputs() {
  [ "$(id -u)" -eq 0 ] && command -v mmdebstrap >/dev/null 2>&1 || return 0
  mkdir -p "$IMAGE_CACHE"
  local key rootfs wheels
  key=$(printf 'bookworm essential merged-usr %s' "$BASE_PACKAGES" | sha256sum | cut -c1-12)
  rootfs="$IMAGE_CACHE/debian-rootfs-$key.tar"
  if [ ! -s "$rootfs" ]; then
    echo "setup: building the image test's Debian root filesystem (once, ~1 min)"
    # the merged-usr hook makes the /usr symlinks itself, so usrmerge (and with it perl) stays out
    if mmdebstrap --quiet --format=tar --variant=essential --include="$BASE_PACKAGES" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$rootfs.partial.$$" >"$IMAGE_CACHE/mmdebstrap.log" 2>&1; then
      mv "$rootfs.partial.$$" "$rootfs"
      find "$IMAGE_CACHE" -maxdepth 1 -name 'debian-rootfs-*.tar' ! -name '*.partial.*' ! -name "${rootfs##*/}" -delete  # older inputs
    else
      rm -f "$rootfs.partial.$$"
      echo "setup: mmdebstrap failed (see $IMAGE_CACHE/mmdebstrap.log); the image test will be skipped" >&2
    fi
  fi
  wheels="$IMAGE_CACHE/wheels-$(sha256sum pyproject.toml | cut -c1-12)"
  if [ ! -d "$wheels" ]; then
    echo "setup: downloading wheels of dnsmirror's dependencies for the image test (once)"
    if "$VENV/bin/pip" download --quiet --only-binary=:all: --dest "$wheels.partial.$$" . 'setuptools>=77' \
        >"$IMAGE_CACHE/wheels.log" 2>&1; then
      mv -T "$wheels.partial.$$" "$wheels" 2>/dev/null || rm -rf "$wheels.partial.$$"  # another run was first
      find "$IMAGE_CACHE" -maxdepth 1 -name 'wheels-*' ! -name '*.partial.*' ! -name "${wheels##*/}" -exec rm -rf {} +
    else
      rm -rf "$wheels.partial.$$"
      echo "setup: pip download failed (see $IMAGE_CACHE/wheels.log); the image test will be skipped" >&2
    fi
  fi
}
# only the tests need them: `make run` stays a quick set-up
if [ "${1:-}" = test ]; then
  image_inputs
fi
