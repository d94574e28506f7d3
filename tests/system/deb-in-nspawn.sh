#!/usr/bin/env bash
# The amd64 .deb on a real systemd: a bookworm container booted with systemd-nspawn (PID 1 is
# systemd there, see ../shared/notes/systemd-nspawn.md). Installs the package and checks, in
# order: active through READY=1, the startup line in the journal with its fields, an image
# through the service, reload applying a config change, a wedged daemon restarted by the
# watchdog, a clean stop, the example Dapr sidecar unit running the real daprd beside it, an
# upgrade keeping the edited conffile, and a purge leaving nothing.
# Also: systemd-analyze verify (any stderr fails) and security exposure <= 2.0.
#
# Needs root, debootstrap and systemd-container (scripts/setup.sh installs them). Builds the
# test-hooks package variant (SIGUSR1 stalls the health loop) with cross/build-deb.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOTFS="${EDGEFN_ROOTFS:-/var/cache/edgefn/rootfs-bookworm}"
DEBS="$(mktemp -d /var/tmp/edgefn-debs.XXXXXX)"
ASSETS="${EDGEFN_ASSETS:-/var/cache/edgefn/assets}"
PORT="${EDGEFN_NSPAWN_PORT:-18190}"
NSPID=""
fail() { echo "deb-in-nspawn: FAIL: $*" >&2; [ -n "${CPID:-}" ] && inside journalctl -u edgefn --no-pager -n 40 >&2 || true; exit 1; }
ok() { echo "deb-in-nspawn: ok: $*"; }
cleanup() {
  if [ -n "$NSPID" ]; then
    kill "$NSPID" 2>/dev/null || true
    for _ in $(seq 50); do [ -d "/proc/$NSPID" ] || break; sleep 0.1; done
    kill -9 "$NSPID" 2>/dev/null || true
  fi
  rm -rf "$DEBS"
}
trap cleanup EXIT

# A cached bookworm rootfs with systemd (about 1 min and 240 MB the first time).
if [ ! -x "$ROOTFS/usr/bin/systemctl" ]; then
  rm -rf "$ROOTFS.tmp"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,libpam-systemd \
    bookworm "$ROOTFS.tmp" http://deb.debian.org/debian >/dev/null
  mv "$ROOTFS.tmp" "$ROOTFS"
fi

# The test variant, and the same at a higher version for the upgrade.
EDGEFN_FEATURES=test-hooks EDGEFN_DEB_OUT="$DEBS/v1" cross/build-deb.sh amd64 >/dev/null
EDGEFN_FEATURES=test-hooks EDGEFN_DEB_OUT="$DEBS/v2" EDGEFN_DEB_VERSION=0.1.1-1 cross/build-deb.sh amd64 >/dev/null
cp "$ASSETS/chelsea.png" "$DEBS/"

systemd-nspawn -q -D "$ROOTFS" --ephemeral --register=no --keep-unit -b --console=passive \
  --bind-ro="$DEBS:/root/debs" >/dev/null 2>&1 &
NSPID=$!
CPID=""
inside() { nsenter -t "$CPID" -a "$@"; }
state=""
for _ in $(seq 150); do
  # The container's PID 1 is nspawn's child once it has exec'd systemd.
  CPID="$(ps -o pid= --ppid "$NSPID" 2>/dev/null | head -n1 | tr -d ' ' || true)"
  if [ -n "$CPID" ] && [ "$(cat "/proc/$CPID/comm" 2>/dev/null)" = systemd ]; then
    state="$(inside systemctl is-system-running 2>/dev/null || true)"
    case "$state" in running|degraded) break ;; esac
  fi
  sleep 0.2
done
case "$state" in running|degraded) ;; *) fail "container systemd: ${state:-no PID 1}" ;; esac
ok "container booted ($state)"

# Matches are `grep -c ... >/dev/null`, not `grep -q`: -q stops at the first match, the writer
# (journalctl, curl) then dies of SIGPIPE, and pipefail fails a line that matched. A CI run
# failed "no stop line" on a journal that held it.

# Install: the unit becomes active only through READY=1 (Type=notify).
inside dpkg -i /root/debs/v1/edgefn_0.1.0-1_amd64.deb >/dev/null
[ "$(inside systemctl is-active edgefn)" = active ] || fail "not active after install"
[ "$(inside systemctl show -p Type --value edgefn)" = notify ] || fail "not Type=notify"
inside systemctl show -p StatusText --value edgefn | grep -c functions >/dev/null || fail "no STATUS= text"
ok "installed; active (running) through READY=1; status: $(inside systemctl show -p StatusText --value edgefn)"

# The startup line, with structured fields, in the journal.
inside journalctl -u edgefn -o verbose --no-pager | grep -c 'MESSAGE=edgefn ready' >/dev/null || fail "no startup line"
# As many functions as the package ships precompiled.
shipped="$(dpkg-deb -c "$DEBS/v1/edgefn_0.1.0-1_amd64.deb" | grep -c '\.cwasm$')"
inside journalctl -u edgefn -o verbose --no-pager | grep -Eq "^ *(F_)?FUNCTIONS=$shipped\$" \
  || fail "startup line lacks its fields (FUNCTIONS=$shipped)"
ok "journal has the startup line with structured fields"

# Unit checks with the binary in place.
verify="$(inside systemd-analyze verify /usr/lib/systemd/system/edgefn.service 2>&1 >/dev/null || true)"
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"
exposure="$(inside systemd-analyze security --offline=true /usr/lib/systemd/system/edgefn.service 2>/dev/null | sed -n 's/.*Overall exposure level for edgefn.service: \([0-9.]*\).*/\1/p')"
awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 2.0) }' || fail "security exposure $exposure > 2.0"
ok "systemd-analyze verify clean; security exposure $exposure"

# Move it to a free port through the conffile (an edit the upgrade must keep), then reload.
inside sed -i "s/^listen = .*/listen = \"127.0.0.1:$PORT\"/; s/^deadline = .*/deadline = \"3s\"/" /etc/edgefn/edgefn.toml
inside systemctl reload edgefn
[ "$(inside systemctl is-active edgefn)" = active ] || fail "not active after reload"
curl -fsS "http://127.0.0.1:$PORT/v1/functions" | grep -c '"deadline_ms":3000' >/dev/null || fail "reload did not apply the config change"
[ -z "$(inside journalctl -u edgefn -p err --no-pager -q)" ] || fail "errors in the journal after reload"
ok "reload applied the change (new port, deadline 3 s), unit active, no errors"

# An image through the service comes back grayscale (PNG colour type 0).
curl -fsS --data-binary @"$DEBS/chelsea.png" "http://127.0.0.1:$PORT/v1/functions/grayscale" -o "$DEBS/gray.png"
python3 - "$DEBS/gray.png" <<'PY' || fail "the service's answer is not a grayscale PNG"
import sys, struct
d = open(sys.argv[1], "rb").read()
assert d[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
w, h, depth, colour = struct.unpack(">IIBB", d[16:26])
assert (w, h, colour) == (451, 300, 0), (w, h, colour)
PY
ok "image POSTed to the service came back grayscale (451x300)"

# classify through the packaged LiteRT and model, under the unit's sandbox.
curl -sS --data-binary @"$DEBS/chelsea.png" "http://127.0.0.1:$PORT/v1/functions/classify" -o "$DEBS/class.json"
python3 - "$DEBS/class.json" <<'PY' || fail "classify in the service: $(cat "$DEBS/class.json")"
import sys, json
j = json.load(open(sys.argv[1]))
assert j["label"] == "Egyptian cat" and abs(j["score"] - 0.816) <= 0.03, j
PY
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep -c '^edgefn_model_loads_total{model="efficientnet-lite0"} 1$' >/dev/null || fail "model loads != 1"
ok "classify in the service: $(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j["label"], j["score"])' "$DEBS/class.json")"

# Startup time with a warm cache, and idle memory.
inside systemctl stop edgefn
t0=$(date +%s%N); inside systemctl start edgefn; t1=$(date +%s%N)
pid="$(inside systemctl show -p MainPID --value edgefn)"
rss="$(inside awk '/VmRSS/ {print $2}' "/proc/$pid/status")"
echo "deb-in-nspawn: report: systemctl start to active $(( (t1 - t0) / 1000000 )) ms; idle RSS $(( rss / 1024 )) MB; .deb $(stat -c %s "$DEBS/v1/edgefn_0.1.0-1_amd64.deb") bytes"

# A wedged daemon: the watchdog kills and restarts it.
inside mkdir -p /etc/systemd/system/edgefn.service.d
printf '[Service]\nWatchdogSec=3s\n' | inside tee /etc/systemd/system/edgefn.service.d/watchdog-test.conf >/dev/null
inside systemctl daemon-reload
inside systemctl restart edgefn
before="$(inside systemctl show -p NRestarts --value edgefn)"
inside systemctl kill -s USR1 --kill-whom=main edgefn
for _ in $(seq 60); do
  [ "$(inside systemctl show -p NRestarts --value edgefn)" -gt "$before" ] && break
  sleep 0.5
done
[ "$(inside systemctl show -p NRestarts --value edgefn)" -gt "$before" ] || fail "watchdog did not restart the wedged daemon"
inside journalctl -u edgefn --no-pager | grep -ci "watchdog timeout" >/dev/null || fail "no watchdog timeout in the journal"
for _ in $(seq 40); do [ "$(inside systemctl is-active edgefn)" = active ] && break; sleep 0.25; done
[ "$(inside systemctl is-active edgefn)" = active ] || fail "not active again after the watchdog restart"
inside rm -rf /etc/systemd/system/edgefn.service.d && inside systemctl daemon-reload
ok "wedged daemon killed by the watchdog and restarted"

# A clean stop.
inside systemctl stop edgefn
[ "$(inside systemctl show -p Result --value edgefn)" = success ] || fail "stop result: $(inside systemctl show -p Result --value edgefn)"
[ "$(inside systemctl show -p ExecMainStatus --value edgefn)" = 0 ] || fail "exit status on stop"
inside journalctl -u edgefn --no-pager | grep -c "edgefn stopped" >/dev/null || fail "no stop line"
ok "systemctl stop exits cleanly (status 0)"

# The example sidecar unit (packaging/daprd/): the real daprd under systemd with its hardening,
# edgefn ordered after it, and the seed's service invocation through it. Test ports replace
# the example's in a drop-in: the container shares the host's network.
cp "$(scripts/build-daprd.sh)" packaging/daprd/daprd.service packaging/daprd/edgefn.service.d/after-daprd.conf "$DEBS/"
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DHTTP=$(free); DGRPC=$(free); DINTERNAL=$(free); DMETRICS=$(free)
printf 'apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: upstream\nspec:\n  type: pubsub.in-memory\n  version: v1\n' > "$DEBS/memory.yaml"
printf '[Service]\nExecStart=\nExecStart=/usr/local/bin/daprd --app-id edgefn --app-port %s --app-protocol http --dapr-http-port %s --dapr-grpc-port %s --dapr-internal-grpc-port %s --metrics-port %s --resources-path /etc/dapr/components --log-as-json\n' \
  "$PORT" "$DHTTP" "$DGRPC" "$DINTERNAL" "$DMETRICS" > "$DEBS/test-ports.conf"
inside mkdir -p /usr/local/bin /etc/dapr/components /etc/systemd/system/edgefn.service.d /etc/systemd/system/daprd.service.d
inside cp /root/debs/daprd /usr/local/bin/daprd
inside cp /root/debs/daprd.service /etc/systemd/system/daprd.service
inside cp /root/debs/after-daprd.conf /etc/systemd/system/edgefn.service.d/
inside cp /root/debs/test-ports.conf /etc/systemd/system/daprd.service.d/
inside cp /root/debs/memory.yaml /etc/dapr/components/
inside systemctl daemon-reload
verify="$(inside systemd-analyze verify /etc/systemd/system/daprd.service 2>&1 >/dev/null || true)"
[ -z "$verify" ] || fail "systemd-analyze verify daprd.service: $verify"
inside systemctl show -p After --value edgefn | grep -c daprd.service >/dev/null || fail "edgefn.service is not ordered after daprd.service"
inside systemctl start edgefn
[ "$(inside systemctl is-active daprd)" = active ] || fail "daprd.service not started with edgefn (Wants=)"
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$DHTTP/v1.0/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS --data-binary @"$DEBS/chelsea.png" "http://127.0.0.1:$DHTTP/v1.0/invoke/edgefn/method/api/image" -o "$DEBS/gray-dapr.png" \
  || { inside journalctl -u daprd --no-pager -n 30 >&2; fail "service invocation through daprd.service"; }
cmp -s "$DEBS/gray.png" "$DEBS/gray-dapr.png" || fail "the image through daprd differs from the direct answer"
ok "daprd.service (example unit, verify clean) started with edgefn; /api/image through it matches"
inside systemctl stop edgefn daprd
inside rm -rf /etc/systemd/system/edgefn.service.d /etc/systemd/system/daprd.service.d /etc/systemd/system/daprd.service
inside systemctl daemon-reload

# Upgrade: the edited conffile stays; the service runs the new version.
inside systemctl start edgefn
inside dpkg -i --force-confold /root/debs/v2/edgefn_0.1.1-1_amd64.deb >/dev/null
inside grep -q "127.0.0.1:$PORT" /etc/edgefn/edgefn.toml || fail "upgrade replaced the edited conffile"
[ "$(inside dpkg-query -W -f='${Version}' edgefn)" = 0.1.1-1 ] || fail "version after upgrade"
[ "$(inside systemctl is-active edgefn)" = active ] || fail "not active after upgrade"
ok "upgrade to 0.1.1-1 kept the edited conffile; service active"

# Purge: no unit, config or state left.
inside dpkg --purge edgefn >/dev/null
for p in /usr/lib/systemd/system/edgefn.service /etc/systemd/system/multi-user.target.wants/edgefn.service \
         /etc/edgefn /var/lib/edgefn /var/lib/private/edgefn /var/cache/edgefn /var/cache/private/edgefn /usr/bin/edgefn; do
  inside test ! -e "$p" || fail "$p left after purge"
done
ok "apt purge left no unit, config, state or cache"

inside systemctl poweroff >/dev/null 2>&1 || true
echo "deb-in-nspawn: all checks passed"
