#!/bin/bash
# tests/package/install.sh DEBDIR — runs inside a clean Debian 12 booted with
# systemd (scripts/package-test starts it: scripts/vm-run --systemd-root).
# An admin's day with the packages, checked at each step:
#   1. `apt install ./*.deb` on a system that has never seen them;
#   2. systemd brought mirror-server up, as its system user, from the
#      package's /etc/mirror-server/server.toml; man pages and completions
#      are where man and bash look;
#   3. a client is enrolled and a device comes up from
#      /etc/ublk-mirror/NAME.toml with `systemctl start ublk-mirror@NAME`,
#      and what is written on it reaches the server;
#   4. `dpkg --purge` of both leaves no file behind but the data
#      (/var/lib/mirror-server, /var/lib/ublk-mirror).
set -euo pipefail
DEBS=$(realpath "$1")
say() { echo "package-test: $*"; }
fail() {
  echo "package-test: FAIL: $*"
  systemctl --no-pager status mirror-server 'ublk-mirror@*' 2>&1 | tail -n 40 || true
  exit 1
}
# files on the root filesystem, but those that any system's use changes
# (logs, caches, apt's and dpkg's and systemd's state)
files() {
  find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp \
    -o -path /var/tmp -o -path /var/log -o -path /var/cache -o -path /var/lib/dpkg \
    -o -path /var/lib/apt -o -path /var/lib/systemd -o -path /vmctl -o -path /root \) -prune \
    -o -print | sort
}
wait_for() { # SECONDS WHAT COMMAND...
  local n=$1 what=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  fail "$what (after ${n}s)"
}

files > /tmp/before
say "apt install $(cd "$DEBS" && echo ./*.deb)"
(cd "$DEBS" && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./mirror-server_*.deb ./ublk-mirror_*.deb) \
  > /tmp/apt.log 2>&1 || { cat /tmp/apt.log; fail "apt install"; }
files > /tmp/installed
for f in /usr/bin/mirror-server /usr/bin/ublk-mirror /etc/mirror-server/server.toml \
         /etc/ublk-mirror/device.toml.example /usr/lib/sysusers.d/mirror-server.conf \
         /etc/needrestart/conf.d/ublk-mirror.conf /usr/lib/tmpfiles.d/ublk-mirror.conf; do
  grep -qx "$f" /tmp/installed || fail "$f is not installed"
done
grep -q "certificate fingerprint" /tmp/apt.log || { cat /tmp/apt.log; fail "postinst did not run mirror-server init"; }
# The postinst applies the tmpfiles rule by its installed name.
grep -q "systemd-tmpfiles --create ublk-mirror.conf" /var/lib/dpkg/info/ublk-mirror.postinst ||
  fail "ublk-mirror's postinst does not apply /usr/lib/tmpfiles.d/ublk-mirror.conf"

# 2. the server, as systemd runs it
[ "$(systemctl is-enabled mirror-server)" = enabled ] || fail "mirror-server.service is not enabled"
wait_for 60 "mirror-server.service did not become active" systemctl is-active --quiet mirror-server
[ "$(ps -o user= -C mirror-server | head -n1)" = mirror-server ] || fail "the server does not run as user mirror-server"
[ "$(stat -c %U:%a /var/lib/mirror-server)" = mirror-server:700 ] || fail "/var/lib/mirror-server: $(stat -c %U:%a /var/lib/mirror-server)"
[ ! -e /var/lib/mirror-server/server.toml ] || fail "init wrote a second config into the data directory"
wait_for 60 "the server does not listen on udp 4747" sh -c 'grep -qi ":128B " /proc/net/udp6 /proc/net/udp'
say "mirror-server.service is active as user mirror-server, on udp 4747"
for page in mirror-server mirror-server-client-add ublk-mirror ublk-mirror-add; do
  [ -s "/usr/share/man/man1/$page.1.gz" ] || fail "no man page $page(1)"
done
zcat /usr/share/man/man1/ublk-mirror-add.1.gz | grep -q -F -- '\-\-backing' || fail "ublk-mirror-add(1) does not document --backing"
out=$(bash -c 'source /usr/share/bash-completion/completions/ublk-mirror && complete -p ublk-mirror')
[[ $out == *ublk-mirror* ]] || fail "bash completion for ublk-mirror is not defined"
[ -s /usr/share/zsh/vendor-completions/_mirror-server ] || fail "no zsh completion"
say "man pages and completions are installed"

# 3. a client, a device from /etc/ublk-mirror/NAME.toml, its data mirrored
token=$(mirror-server client add pkgtest --address 127.0.0.1:4747)
ublk-mirror enroll "$token" > /tmp/enroll.log 2>&1 || { cat /tmp/enroll.log; fail "enroll"; }
mirror-server client list | grep -q pkgtest || fail "client list does not show pkgtest"
# the README's way: the packaged example, edited
cp /etc/ublk-mirror/device.toml.example /etc/ublk-mirror/pkgtest.toml
sed -i -e 's|NAME\.img|pkgtest.img|' -e 's|^size = .*|size = "64M"|' \
  -e 's|^# mirror = .*|mirror = "disk"|' -e 's|^# mirror_interval = .*|mirror_interval = "1s"|' \
  /etc/ublk-mirror/pkgtest.toml
grep -q '^mirror = "disk"' /etc/ublk-mirror/pkgtest.toml || fail "the example has no mirror line to uncomment"
systemctl enable ublk-mirror@pkgtest 2>/dev/null || fail "systemctl enable ublk-mirror@pkgtest"
systemctl start ublk-mirror@pkgtest || fail "systemctl start ublk-mirror@pkgtest"
dev=$(systemctl show -p StatusText --value ublk-mirror@pkgtest | grep -o '/dev/ublkb[0-9]*')
[ -b "$dev" ] || fail "no block device after start (status: $(systemctl show -p StatusText --value ublk-mirror@pkgtest))"
say "ublk-mirror@pkgtest serves $dev"
head -c 1M /dev/urandom > /tmp/data
dd if=/tmp/data of="$dev" bs=1M oflag=direct conv=fsync status=none
ublk-mirror sync "${dev#/dev/ublkb}" > /tmp/sync.log 2>&1 || { cat /tmp/sync.log; fail "ublk-mirror sync"; }
mirror-server volumes --json > /tmp/volumes.json
grep -q '"pkgtest/disk"' /tmp/volumes.json || { cat /tmp/volumes.json; fail "the server has no volume pkgtest/disk"; }
cmp -n 1048576 /tmp/data /var/lib/mirror-server/volumes/pkgtest/disk/image ||
  fail "the server's image does not hold what was written"
say "what was written on $dev is on the server"
# a whole disk: root's alone
[ "$(stat -c %a /var/lib/ublk-mirror/pkgtest.img)" = 600 ] ||
  fail "the backing file is mode $(stat -c %a /var/lib/ublk-mirror/pkgtest.img), not 600"
[ "$(stat -c %a /var/lib/ublk-mirror)" = 700 ] || fail "/var/lib/ublk-mirror is not 0700"
# the metrics unit (sandboxed, as its timer starts it) writes the device's
# metrics for node_exporter, in the format its textfile collector reads
mkdir -p /var/lib/prometheus/node-exporter
systemctl start ublk-mirror-metrics.service || fail "ublk-mirror-metrics.service failed"
prom=/var/lib/prometheus/node-exporter/ublk-mirror.prom
grep -q '^# TYPE ublk_mirror_epochs_shipped_total counter' "$prom" &&
  grep -q '^ublk_mirror_epochs_shipped_total{' "$prom" ||
  { cat "$prom"; fail "ublk-mirror-metrics.service wrote no counters for the device"; }
rm -r /var/lib/prometheus
say "ublk-mirror-metrics.service writes the device's metrics"
# an upgrade (both packages, a newer version) while the device is mounted:
# its daemon goes on, not restarted, and the file system stays writable
mkfs.ext4 -q -F "$dev"
mkdir -p /tmp/pkgmnt && mount "$dev" /tmp/pkgmnt && echo before > /tmp/pkgmnt/f && sync
pid=$(systemctl show -p MainPID --value ublk-mirror@pkgtest)
for p in ublk-mirror mirror-server; do
  rm -rf /tmp/repack && dpkg-deb -R "$DEBS"/${p}_*.deb /tmp/repack
  sed -i 's/^Version: .*/&.1/' /tmp/repack/DEBIAN/control
  dpkg-deb -b /tmp/repack "/tmp/${p}_next.deb" > /dev/null || fail "repacking $p as a newer version"
done
(cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ./mirror-server_next.deb ./ublk-mirror_next.deb) \
  > /tmp/upgrade.log 2>&1 || { cat /tmp/upgrade.log; fail "apt install of the newer packages"; }
dpkg-query -W -f '${Version}' ublk-mirror | grep -q '\.1$' || fail "ublk-mirror was not upgraded"
[ "$(systemctl show -p MainPID --value ublk-mirror@pkgtest)" = "$pid" ] ||
  fail "the upgrade restarted ublk-mirror@pkgtest under a mounted file system"
{ echo after >> /tmp/pkgmnt/f && sync; } || fail "the file system on $dev is not writable after the upgrade"
umount /tmp/pkgmnt
wait_for 60 "mirror-server.service is not active after the upgrade" systemctl is-active --quiet mirror-server
say "an upgrade left the mounted device's daemon running (pid $pid) and the server active"
# root imports an image only root reads (opened before the command acts
# as the data's owner)
head -c 1M /dev/urandom > /root/seed.img
chmod 600 /root/seed.img
mirror-server import pkgtest/seeded --from /root/seed.img > /tmp/import.log 2>&1 ||
  { cat /tmp/import.log; fail "mirror-server import of a file only root reads"; }
cmp /root/seed.img /var/lib/mirror-server/volumes/pkgtest/seeded/image ||
  fail "the imported image differs from its file"
say "root imports an image only root reads"
# root's admin commands (client add, volumes, import) act as the data's owner
foreign=$(find /var/lib/mirror-server ! -user mirror-server)
[ -z "$foreign" ] || fail "files in /var/lib/mirror-server the server's user does not own: $foreign"
systemctl disable --now ublk-mirror@pkgtest 2>/dev/null
[ ! -e "$dev" ] || fail "$dev still there after systemctl stop"

# 4. purge
rm /etc/ublk-mirror/pkgtest.toml # the admin's own file (dpkg would rightly keep it)
DEBIAN_FRONTEND=noninteractive dpkg --purge ublk-mirror mirror-server > /tmp/purge.log 2>&1 ||
  { cat /tmp/purge.log; fail "dpkg --purge"; }
systemctl is-active --quiet mirror-server && fail "mirror-server still runs after purge"
files > /tmp/after
left=$(comm -13 /tmp/before /tmp/after | grep -v -e '^/var/lib/mirror-server\(/\|$\)' -e '^/var/lib/ublk-mirror\(/\|$\)' || true)
if [ -n "$left" ]; then
  echo "$left"
  fail "purge left files behind (above)"
fi
[ -d /var/lib/mirror-server/identity ] || fail "purge removed the data: no /var/lib/mirror-server/identity"
say "dpkg --purge left nothing but the data ($(comm -13 /tmp/before /tmp/after | wc -l) paths under /var/lib/mirror-server and /var/lib/ublk-mirror)"
say "ok"
