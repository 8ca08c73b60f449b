#!/usr/bin/env bash
# meshnode set-up for a fresh Debian 12 host, as root; idempotent.
#   ./setup.sh          install system packages, kernel headers, bpffs, venv + meshnode
#   ./setup.sh demo     ... then start an agent and run the demo
#   ./setup.sh test     ... with test tools, then run the whole test suite
#   ./setup.sh bench    ... with HAProxy, nginx, wrk and matplotlib, then the benchmarks
#                       (arguments go to `python -m tests.bench`, e.g. --quick)
#   ./setup.sh service [AGENT ARGS...]
#                       ... then run `meshnode agent ARGS` as the systemd unit meshnode-agent
#   ./setup.sh vagrant  install Vagrant, libvirt and QEMU, then the multi-VM tests
#                       (arguments go to `python -m tests.vagrant`)
# MESHNODE_WHEELS=DIR installs the Python dependencies from that wheelhouse only (no PyPI).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mode=${1:-install}
shift || true
venv=${MESHNODE_VENV:-$here/.venv}

if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=MESHNODE_VENV,MESHNODE_WHEELS "$0" "$mode" "$@"
fi
export DEBIAN_FRONTEND=noninteractive

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# 1. Debian packages: only what is missing, so a second run touches nothing.
pkgs=(python3-bpfcc python3-cryptography python3-venv python3-dev iptables bpftool linux-headers-amd64 iproute2 util-linux procps gcc)
# the tests start real etcd clusters (multi-host discovery)
case "$mode" in test|drill) pkgs+=(etcd-server etcd-client);; esac  # also the drill's etcd faults
# ... and render the dashboard in headless Chromium (fonts for readable screenshots)
[ "$mode" = test ] && pkgs+=(chromium fonts-dejavu-core)
# ... and drive HTTP/1.1 and HTTP/2 through the proxy with real clients (curl is in the base)
case "$mode" in test|bench) pkgs+=(wrk nghttp2-client curl);; esac
# the benchmarks compare against HAProxy and nginx (stream is a module in Debian 12), load HTTP
# with wrk and chart with matplotlib; the kernel path's real clients: redis-benchmark against
# redis-server, pgbench against PostgreSQL
[ "$mode" = bench ] && pkgs+=(haproxy nginx libnginx-mod-stream python3-matplotlib
  redis-server redis-tools postgresql)
# the Vagrant testbed: three Debian VMs under libvirt, a box built from the mirror
[ "$mode" = vagrant ] && pkgs+=(vagrant vagrant-libvirt libvirt-daemon-system
  libvirt-daemon-driver-qemu libvirt-clients dnsmasq-base qemu-system-x86 qemu-utils
  mmdebstrap e2fsprogs fdisk grub-pc-bin grub2-common)
# (one dpkg-query for all of them: a process each costs seconds on an emulated VM)
mapfile -t installed < <(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' "${pkgs[@]}" \
  2>/dev/null | awk '$1 == "ii" {print $2}')
missing=()
for p in "${pkgs[@]}"; do
  [[ " ${installed[*]} " == *" $p "* ]] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a system etcd on install; the tests run their own clusters, and an
  # unauthenticated etcd left running on every boot is not ours to leave behind.
  if [[ " ${missing[*]} " == *" etcd-server "* ]]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
  # Likewise nginx (port 80 on every address), HAProxy, redis and PostgreSQL: the benchmarks
  # start their own.
  for svc in nginx haproxy redis-server postgresql; do
    if [[ " ${missing[*]} " == *" $svc "* ]]; then
      systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
    fi
  done
fi

# 2. Kernel headers for bcc: a kernel without its own build tree gets Debian's headers
#    (our programs only use uapi structs); Debian splits them into -amd64 and -common.
mods=/lib/modules/$(uname -r)
if [ ! -e "$mods/build/include" ]; then
  arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common_dir=${arch_dir%-amd64}-common
  if [ -z "$arch_dir" ] || [ ! -d "$common_dir" ]; then
    log "no kernel headers under /usr/src: install linux-headers-amd64"; exit 69
  fi
  log "linking $mods/build -> $arch_dir"
  mkdir -p "$mods"
  ln -sfn "$arch_dir" "$mods/build"
  ln -sfn "$common_dir" "$mods/source"
fi

# 3. bpffs for pinned maps and programs.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# 4. The venv: Debian's python3 so that bcc (python3-bpfcc) is importable.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  log "creating venv $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
extra=""
[ "$mode" = test ] && extra="[test]"
stamp="$venv/.meshnode-installed$extra"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  log "installing meshnode$extra into $venv"
  # a wheelhouse (hosts without PyPI, e.g. the Vagrant VMs) or the index
  from=()
  if [ -n "${MESHNODE_WHEELS:-}" ]; then
    # No .pyc up front, and no isolated build environment (the build backend comes from the
    # wheelhouse into the venv once): under emulation each of those costs minutes.
    from=(--no-index --find-links "$MESHNODE_WHEELS" --no-compile)
    if ! "$venv/bin/python" -c 'import setuptools as s, wheel, sys
sys.exit(int(s.__version__.split(".")[0]) < 68)' 2>/dev/null; then
      "$venv/bin/pip" install -q --disable-pip-version-check "${from[@]}" "setuptools>=68" wheel
    fi
    from+=(--no-build-isolation)
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "${from[@]}" -e "$here$extra"
  touch "$stamp"
fi
ln -sfn "$venv/bin/meshnode" /usr/local/bin/meshnode

case "$mode" in
  install) log "ready: meshnode $("$venv/bin/meshnode" --version)";;
  demo) exec "$venv/bin/meshnode" demo "$@";;
  test)
    cd "$here"
    log "static checks: ruff, mypy, import contracts"
    "$venv/bin/ruff" check meshnode cli tests
    "$venv/bin/mypy" --no-error-summary meshnode cli
    "$venv/bin/lint-imports" --no-cache >/dev/null || "$venv/bin/lint-imports" --no-cache
    log "tests: unit (no root) and integration (root, real BPF and iptables, both backends)"
    exec "$venv/bin/python" -m pytest "$@";;
  bench)
    cd "$here"
    log "benchmarks: direct, meshnode (eBPF, iptables, explicit), HAProxy, nginx; mTLS, 2 hosts; HTTP/1.1 and h2 (wrk, h2load); the TLS ingress gateway; the kernel path vs proxy, direct and HAProxy with real clients"
    exec "$venv/bin/python" -m tests.bench "$@";;
  drill)
    cd "$here"
    log "fault drill: load through the mesh while each fault happens in turn, both backends"
    exec "$venv/bin/python" -m tests.drill "$@";;
  soak)
    cd "$here"
    log "soak: a fixed load for up to 10 minutes; RSS and descriptors of agent and workers"
    exec "$venv/bin/python" -m tests.drill soak "$@";;
  service)
    # The unit people expect (and the one the Vagrant VMs run):
    # - Type=notify: started once capture and workers serve (the agent sends READY=1);
    # - stop/restart/crash keep the data plane: the workers live in meshnode.slice, outside
    #   the unit's cgroup, so KillMode=mixed (SIGTERM to the agent, SIGKILL to leftovers of
    #   the unit's own cgroup, e.g. a BPF loader) never reaches them; the next agent adopts
    #   them. `meshnode uninstall` is what removes meshnode from the host;
    # - reload: SIGHUP, the agent re-executes in place (new code, /etc/meshnode/agent.yaml
    #   read again) and adopts the data plane; WatchdogSec: its heartbeat (a wedged
    #   reconcile or loop stops it, and systemd restarts it, losing nothing).
    # Flags given here win over the config file. After etcd when it runs here.
    unit=/etc/systemd/system/meshnode-agent.service
    mkdir -p /etc/meshnode
    [ -e /etc/meshnode/agent.yaml ] || printf '%s\n' \
      "# meshnode agent options (meshnode agent --help), one per line, e.g. workers: 2" \
      "# flags in $unit win; apply changes with: systemctl reload meshnode-agent" \
      "{}" >/etc/meshnode/agent.yaml
    new=$(cat <<UNIT
[Unit]
Description=meshnode host agent
Documentation=https://github.com/meshnode/meshnode
After=network-online.target etcd.service
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/meshnode agent --config /etc/meshnode/agent.yaml $*
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
RestartSec=1
WatchdogSec=120
TimeoutStartSec=900
KillMode=mixed

[Install]
WantedBy=multi-user.target
UNIT
)
    if [ "$(cat "$unit" 2>/dev/null)" != "$new" ]; then
      log "writing $unit: meshnode agent $*"
      echo "$new" >"$unit"
      systemctl daemon-reload
      systemctl enable meshnode-agent.service
      systemctl restart meshnode-agent.service
    else
      systemctl enable --now meshnode-agent.service
    fi
    log "meshnode-agent.service: $(systemctl is-active meshnode-agent.service)";;
  vagrant)
    cd "$here"
    exec "$venv/bin/python" -m tests.vagrant "$@";;
  *) log "unknown mode '$mode' (install, demo, test, bench, drill, soak, service or vagrant)"; exit 64;;
esac
