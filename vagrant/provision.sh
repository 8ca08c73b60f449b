#!/usr/bin/env bash
# Vagrant's shell provisioner for one VM, as root. Env from the Vagrantfile: NODE (vmN),
# MESH_IP, MESH_MAC, ETCD_IPS (space-separated member addresses), TTL, CAPTURE (backend).
# Network and etcd are the testbed's; meshnode itself is set up exactly as the README says,
# `setup.sh service`, with the wheelhouse standing in for PyPI.
set -euo pipefail

log() { printf '[provision %s] %s\n' "$NODE" "$*" >&2; }

hostnamectl set-hostname "$NODE" 2>/dev/null || hostname "$NODE"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$NODE" >/etc/hosts

# The mesh network: static, no gateway (no default route anywhere).
cat >/etc/systemd/network/20-mesh.network <<EOF
[Match]
MACAddress=$MESH_MAC

[Network]
Address=$MESH_IP/24
EOF
systemctl enable --now systemd-networkd.service >/dev/null 2>&1
networkctl reload 2>/dev/null || systemctl restart systemd-networkd.service
for _ in $(seq 100); do
  ip -4 -o addr show | grep -q " $MESH_IP/" && break
  sleep 0.2
done
ip -4 -o addr show | grep -q " $MESH_IP/" || { log "no $MESH_IP on any interface"; exit 1; }

# etcd: a member on the first VMs (Debian's unit reads /etc/default/etcd). Started without
# waiting: a new member is ready only once a quorum has started, on the other VMs.
cluster="" registry=""
n=0
for ip in $ETCD_IPS; do
  n=$((n + 1))
  cluster+="${cluster:+,}vm$n=http://$ip:2380"
  registry+="${registry:+,}$ip:2379"
done
if [[ " $ETCD_IPS " == *" $MESH_IP "* ]]; then
  cat >/etc/default/etcd <<EOF
ETCD_NAME=$NODE
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_PEER_URLS=http://$MESH_IP:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$MESH_IP:2380
ETCD_LISTEN_CLIENT_URLS=http://$MESH_IP:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$MESH_IP:2379
ETCD_INITIAL_CLUSTER=$cluster
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=meshnode-vagrant
# emulated CPUs (TCG) answer slowly: avoid needless elections
ETCD_HEARTBEAT_INTERVAL=250
ETCD_ELECTION_TIMEOUT=2500
EOF
  systemctl enable etcd.service >/dev/null 2>&1
  systemctl start --no-block etcd.service
fi

# One proxy worker: each VM has few (emulated) CPUs.
MESHNODE_WHEELS=/opt/meshnode-wheels /opt/meshnode/setup.sh service \
  --registry "etcd://$registry" --host-address "$MESH_IP" --node "$NODE" \
  --registry-ttl "$TTL" --workers 1 --capture "$CAPTURE"

# Ready once the agent says so on its control socket (with eBPF, bcc compiles first: minutes
# under emulation). One polling process: starting `meshnode status` again and again costs
# seconds each under emulation.
if python3 /opt/meshnode/tests/vagrant/guest.py wait-ready 900 | grep -q '"ready": true'; then
  log "agent ready"
  exit 0
fi
log "agent not ready after 900 s"
systemctl status --no-pager meshnode-agent.service || true
exit 1
