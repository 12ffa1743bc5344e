#!/usr/bin/env bash
# Prepares a node for dnsmirror: the cluster root CA in the node trust store, then the node resolver
# pointed at dnsmirror. Idempotent; run it from the node bootstrap (recommended: before containerd
# starts) or from the node-setup DaemonSet beside it. docs/deployment.md explains every step.
#
#   node-setup.sh install     # trust the root CA, then point /etc/resolv.conf at dnsmirror
#   node-setup.sh uninstall   # restore /etc/resolv.conf first, then remove the root CA
#   node-setup.sh status      # what is installed
#
# Order matters:
#   1. the root CA first. Go programs (containerd) read the trust store once per process, so a
#      containerd that is already running must restart once after the CA is added; the script does
#      that only when the trust store changed (DNSMIRROR_RESTART_CMD). A CA baked into the node image
#      or installed by the bootstrap before containerd starts needs no restart.
#   2. the resolver last, and only while dnsmirror answers on DNSMIRROR_ADDRESS: a node pointed at a
#      resolver that is not there cannot resolve anything, not even the registry of dnsmirror's image.
#      The previous nameservers stay in resolv.conf after dnsmirror's address, as a fallback while
#      dnsmirror restarts; they are also saved for dns.upstreams and for kubelet's resolvConf.
#
# Environment:
#   NODE_ROOT               the node's root filesystem (default /; the DaemonSet mounts it at /host)
#   DNSMIRROR_ADDRESS       dnsmirror's node-local address (default 169.254.20.53)
#   DNSMIRROR_METRICS_PORT  its metrics/health port (default 9090): /healthz must answer 200
#   DNSMIRROR_CA_FILE       the root certificate to trust (PEM; required by install)
#   DNSMIRROR_PROBE_NAME    a captured name to query with dig when dig exists (default registry.k8s.io)
#   DNSMIRROR_TRUST_DIR     where the CA goes, relative to NODE_ROOT (default: detected, see below)
#   DNSMIRROR_TRUST_UPDATE  command that rebuilds the trust store (default: detected)
#   DNSMIRROR_RESTART_CMD   command run once when the trust store changed (default: restart containerd;
#                           "" = never restart)
#   DNSMIRROR_SKIP_RESOLVER 1 = leave the resolver alone (trust store only)
set -euo pipefail
shopt -s inherit_errexit  # a failing step inside $(...) stops the script too

NODE_ROOT=${NODE_ROOT:-/}
NODE_ROOT=${NODE_ROOT%/}
ADDRESS=${DNSMIRROR_ADDRESS:-169.254.20.53}
METRICS_PORT=${DNSMIRROR_METRICS_PORT:-9090}
PROBE_NAME=${DNSMIRROR_PROBE_NAME:-registry.k8s.io}
STATE_DIR="$NODE_ROOT/etc/dnsmirror"
RESOLV_CONF="$NODE_ROOT/etc/resolv.conf"
RESOLV_BACKUP="$STATE_DIR/resolv.conf.orig"         # the file (or symlink) before install
RESOLV_UPSTREAM="$STATE_DIR/resolv.conf.upstream"   # the real resolvers: kubelet's resolvConf, dns.upstreams
CA_NAME=dnsmirror-root.crt

log() { echo "node-setup: $*" >&2; }
die() { log "$*"; exit 1; }

# Runs a command in the node's root: directly on the node, through chroot from a container.
in_root() {
  if [ -z "$NODE_ROOT" ]; then "$@"; else chroot "$NODE_ROOT" "$@"; fi
}

# Debian/Ubuntu: update-ca-certificates; RHEL/Fedora/Amazon Linux: update-ca-trust.
detect_trust_store() {
  if [ -n "${DNSMIRROR_TRUST_DIR:-}" ]; then
    TRUST_DIR="$NODE_ROOT/${DNSMIRROR_TRUST_DIR#/}"
    TRUST_UPDATE=${DNSMIRROR_TRUST_UPDATE:-}
  elif [ -x "$NODE_ROOT/usr/sbin/update-ca-certificates" ]; then
    TRUST_DIR="$NODE_ROOT/usr/local/share/ca-certificates"
    # --fresh: without it, a removed certificate can stay in the bundle
    TRUST_UPDATE=${DNSMIRROR_TRUST_UPDATE:-in_root update-ca-certificates --fresh}
  elif [ -x "$NODE_ROOT/usr/bin/update-ca-trust" ]; then
    TRUST_DIR="$NODE_ROOT/etc/pki/ca-trust/source/anchors"
    TRUST_UPDATE=${DNSMIRROR_TRUST_UPDATE:-in_root update-ca-trust extract}
  else
    die "no known trust store tool under ${NODE_ROOT:-/} (set DNSMIRROR_TRUST_DIR and DNSMIRROR_TRUST_UPDATE)"
  fi
  [ -n "$TRUST_UPDATE" ] || die "DNSMIRROR_TRUST_UPDATE is required with DNSMIRROR_TRUST_DIR"
}

restart_containerd() {
  local command=${DNSMIRROR_RESTART_CMD-systemctl restart containerd}
  if [ -z "$command" ]; then
    log "trust store changed; restart containerd yourself (it read the old trust store at start)"
    return
  fi
  log "trust store changed: $command (Go reads the trust store once per process)"
  eval "$command"
}

# Prints "changed" when the trust store was modified.
install_ca() {
  local source=${DNSMIRROR_CA_FILE:?DNSMIRROR_CA_FILE: the root certificate to trust}
  [ -s "$source" ] || die "$source: missing or empty"
  grep -q -- "-----BEGIN CERTIFICATE-----" "$source" || die "$source: not a PEM certificate"
  detect_trust_store
  mkdir -p "$TRUST_DIR"
  if cmp -s "$source" "$TRUST_DIR/$CA_NAME"; then
    log "root CA already in $TRUST_DIR"
    return
  fi
  cp "$source" "$TRUST_DIR/$CA_NAME.tmp"
  chmod 0644 "$TRUST_DIR/$CA_NAME.tmp"
  mv -f "$TRUST_DIR/$CA_NAME.tmp" "$TRUST_DIR/$CA_NAME"
  eval "$TRUST_UPDATE" >&2
  log "root CA installed in $TRUST_DIR"
  echo changed
}

remove_ca() {
  detect_trust_store
  [ -e "$TRUST_DIR/$CA_NAME" ] || return 0
  rm -f "$TRUST_DIR/$CA_NAME"
  eval "$TRUST_UPDATE" >&2
  log "root CA removed from $TRUST_DIR"
  echo changed
}

# dnsmirror must be serving before the node depends on it.
dnsmirror_serving() {
  local status
  status=$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3
    head -n 1 <&3' _ "$ADDRESS" "$METRICS_PORT" 2>/dev/null) || return 1
  case $status in "HTTP/1."?" 200"*) ;; *) return 1 ;; esac
  if command -v dig >/dev/null 2>&1; then
    dig +time=2 +tries=2 +short "@$ADDRESS" "$PROBE_NAME" A >/dev/null || return 1
  fi
}

# The nameservers of a resolv.conf text, minus dnsmirror's own address.
nameservers_of() {
  awk -v own="$ADDRESS" '$1 == "nameserver" && $2 != own { print $2 }' "$1"
}

# The readable path of resolv.conf or its backup, which may be a symlink meant for the node's root
# (one level; a relative target is relative to /etc, where resolv.conf lives).
in_node_root() {
  local path=$1 target
  [ -L "$path" ] || { echo "$path"; return; }
  target=$(readlink "$path")
  case $target in
    /*) echo "$NODE_ROOT$target" ;;
    *) echo "$NODE_ROOT/etc/$target" ;;
  esac
}

install_resolver() {
  mkdir -p "$STATE_DIR"
  if [ ! -e "$RESOLV_BACKUP" ] && [ ! -L "$RESOLV_BACKUP" ]; then
    [ -e "$(in_node_root "$RESOLV_CONF")" ] || die "$RESOLV_CONF: missing"
    # a symlink (systemd-resolved) is kept as a symlink, so uninstall restores it exactly
    cp -P "$RESOLV_CONF" "$RESOLV_BACKUP"
  fi
  # Where the real resolvers are: systemd-resolved's stub (127.0.0.53) hides them in its own file.
  local real
  real=$(in_node_root "$RESOLV_BACKUP")
  case " $(nameservers_of "$real" | tr '\n' ' ') " in
    *" 127.0.0.53 "*)
      if [ -f "$NODE_ROOT/run/systemd/resolve/resolv.conf" ]; then real="$NODE_ROOT/run/systemd/resolve/resolv.conf"; fi ;;
  esac
  local upstreams
  upstreams=$(nameservers_of "$real" | grep -v '^127\.' | head -n 3 || true)
  [ -n "$upstreams" ] || die "no upstream nameserver in $real: nothing to forward to, not switching"
  grep -v '^nameserver' "$real" >"$RESOLV_UPSTREAM.tmp" || true
  printf 'nameserver %s\n' $upstreams >>"$RESOLV_UPSTREAM.tmp"
  mv -f "$RESOLV_UPSTREAM.tmp" "$RESOLV_UPSTREAM"

  # dnsmirror first; two real resolvers after it keep DNS working while dnsmirror restarts (a closed
  # port answers ICMP unreachable and the resolver moves on at once). resolv.conf allows three.
  {
    echo "# dnsmirror (node-setup.sh); the previous file is $RESOLV_BACKUP"
    echo "nameserver $ADDRESS"
    printf 'nameserver %s\n' $(echo "$upstreams" | head -n 2)
    grep -v -e '^nameserver' -e '^#' "$real" || true
  } >"$RESOLV_CONF.dnsmirror.tmp"
  if [ ! -L "$RESOLV_CONF" ] && cmp -s "$RESOLV_CONF.dnsmirror.tmp" "$RESOLV_CONF"; then
    rm -f "$RESOLV_CONF.dnsmirror.tmp"
    log "resolver already points at dnsmirror"
    return
  fi
  chmod 0644 "$RESOLV_CONF.dnsmirror.tmp"
  mv -fT "$RESOLV_CONF.dnsmirror.tmp" "$RESOLV_CONF"
  log "resolver points at $ADDRESS; upstreams (dns.upstreams, kubelet resolvConf): $RESOLV_UPSTREAM"
}

uninstall_resolver() {
  if [ -e "$RESOLV_BACKUP" ] || [ -L "$RESOLV_BACKUP" ]; then
    cp -P "$RESOLV_BACKUP" "$RESOLV_CONF.dnsmirror.tmp"
    mv -fT "$RESOLV_CONF.dnsmirror.tmp" "$RESOLV_CONF"
    rm -f "$RESOLV_BACKUP" "$RESOLV_UPSTREAM"
    log "resolver restored from $RESOLV_BACKUP"
  fi
}

case ${1:-} in
  install)
    changed=$(install_ca)
    if [ "$changed" = changed ]; then restart_containerd; fi
    if [ "${DNSMIRROR_SKIP_RESOLVER:-0}" != 1 ]; then
      dnsmirror_serving || die "dnsmirror does not answer on $ADDRESS (port 53, /healthz on $METRICS_PORT): resolver left unchanged"
      install_resolver
    fi
    ;;
  uninstall)
    # the resolver first: a node must never point at a dnsmirror that is about to go away
    uninstall_resolver
    changed=$(remove_ca)
    if [ "$changed" = changed ]; then restart_containerd; fi
    ;;
  status)
    detect_trust_store
    if [ -e "$TRUST_DIR/$CA_NAME" ]; then echo "root CA: $TRUST_DIR/$CA_NAME"; else echo "root CA: not installed"; fi
    if [ -e "$RESOLV_BACKUP" ] || [ -L "$RESOLV_BACKUP" ]; then echo "resolver: dnsmirror ($RESOLV_CONF)"; else echo "resolver: unchanged"; fi
    if dnsmirror_serving; then echo "dnsmirror: serving on $ADDRESS"; else echo "dnsmirror: not answering on $ADDRESS"; fi
    ;;
  *)
    echo "usage: $0 install|uninstall|status (see the comments at the top)" >&2
    exit 2
    ;;
esac
