#!/usr/bin/env bash
# Build the libvirt box "meshnode/debian12" from the Debian mirror and add it to Vagrant, as
# root. For machines that can download no box (and need not: everything comes from Debian).
#   vagrant/build-box.sh            build unless the box is there, built by this very script
#   vagrant/build-box.sh --force    build anyway
# Env: MESHNODE_BOX (box name), MESHNODE_DEBIAN_MIRROR, MESHNODE_VAGRANT_CACHE (work dir),
# MESHNODE_BOX_WHEELS (a wheelhouse with requirements.txt: its packages, and meshnode itself,
# are pre-installed in /opt/meshnode/.venv, where setup.sh makes its venv; pip there runs at
# native speed, in the guests it takes minutes. The wheelhouse is kept as /opt/meshnode-wheels,
# from which setup.sh installs whatever is missing).
#
# No loop devices (they show no partitions on these machines): the root filesystem is made
# from a directory with `mkfs.ext4 -d`, put into a partitioned raw disk with dd, and GRUB's
# core image is written right after the MBR; then qcow2 and a plain tar as the box.
# The box already holds everything setup.sh would apt-install, since guests have no mirror.
set -euo pipefail

self=$(readlink -f "${BASH_SOURCE[0]}")
here=$(dirname "$self")
box=${MESHNODE_BOX:-meshnode/debian12}
mirror=${MESHNODE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${MESHNODE_VAGRANT_CACHE:-$here/.cache}
disk_gb=8
label=meshroot

log() { printf '\033[1m[build-box]\033[0m %s\n' "$*" >&2; }

# Runs inside mmdebstrap's customize hook: $1 is the root directory of the new system.
customize() {
  local root=$1
  chroot "$root" useradd --create-home --shell /bin/bash --groups sudo vagrant
  echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"
  install -d -m 0700 "$root/home/vagrant/.ssh"
  # Vagrant's well-known insecure key, as shipped by Debian's vagrant package
  install -m 0600 "$(vagrant_pub)" "$root/home/vagrant/.ssh/authorized_keys"
  chroot "$root" chown -R vagrant:vagrant /home/vagrant/.ssh

  # eth0 (management network) by DHCP; the mesh network is configured by the provisioner
  cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4
EOF
  chroot "$root" systemctl enable systemd-networkd.service
  echo 'nameserver 198.18.0.1' >"$root/etc/resolv.conf"
  echo meshnode-box >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 meshnode-box\n' >"$root/etc/hosts"
  echo "LABEL=$label / ext4 defaults,noatime 0 1" >"$root/etc/fstab"

  # Every VM its own SSH host key and machine-id (the machine-id keys the DHCP lease). One
  # Ed25519 key: `ssh-keygen -A` also makes an RSA key, 90 s of an emulated CPU at first boot,
  # on the way to SSH.
  rm -f "$root"/etc/ssh/ssh_host_*
  printf 'HostKey /etc/ssh/ssh_host_ed25519_key\n' >"$root/etc/ssh/sshd_config.d/10-hostkey.conf"
  cat >"$root/etc/systemd/system/ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate the SSH host key at first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=ssh.service
UNIT
  chroot "$root" systemctl enable ssh-host-keys.service
  : >"$root/etc/machine-id"
  rm -f "$root/var/lib/dbus/machine-id"
  # e2scrub_reap looks for LVM snapshots at every boot (there is no LVM): 100 s of an
  # emulated CPU that the boot shares with everything else.
  chroot "$root" systemctl mask e2scrub_reap.service e2scrub_all.timer >/dev/null

  # etcd is configured per VM by the Vagrantfile's provisioner, never started as it comes
  chroot "$root" systemctl disable etcd.service

  local kver
  kver=$(basename "$(ls -d "$root"/lib/modules/* | sort -V | tail -n 1)")
  install -d "$root/boot/grub/i386-pc"
  cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$root/boot/grub/i386-pc/"
  cat >"$root/boot/grub/grub.cfg" <<EOF
set timeout=0
linux /boot/vmlinuz-$kver root=LABEL=$label ro console=ttyS0 net.ifnames=0 quiet
initrd /boot/initrd.img-$kver
boot
EOF
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

  if [ -n "${MESHNODE_BOX_WHEELS:-}" ]; then
    # The venv setup.sh would make (same interpreter, same options, same place), with the
    # project's dependencies from the wheelhouse.
    # The wheelhouse stays in the box where provision.sh points setup.sh (no synced folder:
    # each costs half a minute of SSH and rsync under emulation).
    install -d "$root/opt/meshnode" "$root/opt/meshnode-wheels"
    cp "$MESHNODE_BOX_WHEELS"/*.whl "$MESHNODE_BOX_WHEELS/requirements.txt" \
      "$root/opt/meshnode-wheels/"
    # (a clean environment: the host's PIP_* settings name paths the chroot does not have)
    local clean=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
    chroot "$root" "${clean[@]}" /usr/bin/python3 -m venv --system-site-packages \
      /opt/meshnode/.venv
    chroot "$root" "${clean[@]}" /opt/meshnode/.venv/bin/pip install -q \
      --disable-pip-version-check --no-index --find-links /opt/meshnode-wheels \
      -r /opt/meshnode-wheels/requirements.txt
    # meshnode itself, editable as setup.sh installs it, from a copy of its packages that the
    # synced folder later replaces: the install only records where they are (and the entry
    # point), which changes only with pyproject.toml, part of the box's key. In the guests
    # this pip run took two minutes.
    local project
    project=$(dirname "$here")
    cp -r "$project/pyproject.toml" "$project/README.md" "$project/meshnode" "$project/cli" \
      "$project/bpf" "$project/iptables" "$root/opt/meshnode/"
    chroot "$root" "${clean[@]}" /opt/meshnode/.venv/bin/pip install -q \
      --disable-pip-version-check --no-index --no-deps --no-build-isolation -e /opt/meshnode
    touch "$root/opt/meshnode/.venv/.meshnode-installed"  # setup.sh's stamp
  fi
}

vagrant_pub() {
  ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub | sort -V | tail -n 1
}

rootfs() {
  local root=$1
  local pkgs=(
    linux-image-amd64 linux-headers-amd64 systemd-sysv udev dbus openssh-server sudo python3
    iptables python3-bpfcc etcd-server etcd-client iproute2 rsync ca-certificates
    # what setup.sh would otherwise apt-install: the guests have no mirror
    python3-venv python3-dev python3-cryptography bpftool util-linux procps gcc
  )
  local IFS=,
  mmdebstrap --variant=minbase --mode=root --format=directory --include="${pkgs[*]}" \
    --customize-hook="\"$self\" --customize \"\$1\"" bookworm "$root" \
    "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb ${mirror%/debian}/debian-security bookworm-security main"
}

# The disk: MBR + GRUB core image in the gap before the partition at 1 MiB, then ext4.
disk() {
  local root=$1 out=$2 part="$cache/part.img" raw="$cache/disk.raw" core="$cache/core.img"
  # the disk is exactly disk_gb (vagrant-libvirt sizes the volume to virtual_size)
  mkfs.ext4 -q -F -L "$label" -O ^orphan_file,^metadata_csum_seed -d "$root" "$part" \
    "$((disk_gb * 1024 - 1))M"
  rm -rf "$root"  # the rootfs is in the image now: free the space before the next copy
  truncate -s "${disk_gb}G" "$raw"
  echo 'start=2048, type=83, bootable' | sfdisk -q "$raw"
  dd if="$part" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
  rm -f "$part"
  grub-mkimage -O i386-pc -o "$core" -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal linux
  dd if=/usr/lib/grub/i386-pc/boot.img of="$raw" bs=440 count=1 conv=notrunc status=none
  dd if="$core" of="$raw" bs=512 seek=1 conv=notrunc status=none
  rm -f "$core"
  qemu-img convert -O qcow2 "$raw" "$out"
  rm -f "$raw"
}

package() {
  local dir=$1 file=$2
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$disk_gb" \
    >"$dir/metadata.json"
  cat >"$dir/Vagrantfile" <<'EOF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
  end
end
EOF
  tar -cf "$file" -C "$dir" metadata.json Vagrantfile box.img
}

main() {
  [ "${1:-}" = --customize ] && { customize "$2"; return; }
  [ "$(id -u)" -eq 0 ] || { log "run as root"; exit 77; }
  local want stamp="$cache/box.stamp"
  want="$box $(sha256sum "$self" | cut -d' ' -f1)"
  if [ -n "${MESHNODE_BOX_WHEELS:-}" ]; then
    want+=" $(cat "$MESHNODE_BOX_WHEELS/requirements.txt" "$(dirname "$here")/pyproject.toml" \
      | sha256sum | cut -d' ' -f1)"
  fi
  if [ "${1:-}" != --force ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
      && vagrant box list 2>/dev/null | grep -q "^$box "; then
    log "box $box is up to date"; return
  fi
  mkdir -p "$cache"
  local work="$cache/box-work"
  rm -rf "$work" && mkdir -p "$work/box"
  # shellcheck disable=SC2064 # expand now: the locals are gone when the trap runs
  trap "rm -rf '$work' '$cache/part.img' '$cache/disk.raw' '$cache/core.img'" EXIT
  log "rootfs from $mirror (mmdebstrap)"
  rootfs "$work/root"
  log "disk image"
  disk "$work/root" "$work/box/box.img"
  package "$work/box" "$work/box.box"
  rm -f "$work/box/box.img"
  log "vagrant box add $box"
  vagrant box add --force --name "$box" "$work/box.box" >/dev/null
  echo "$want" >"$stamp"
  log "box $box ready"
}

main "$@"
