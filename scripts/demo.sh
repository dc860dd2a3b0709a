#!/usr/bin/env bash
# The main job: a phone and two cloudlets on a small emulated WAN on this
# machine (network namespaces: the phone's network with the cloud tier,
# edge-1 2 ms away one way, edge-2 30 ms). The cloudlets, with the embedded
# defaults, register in a directory; the phone finds its cloudlet through
# the directory, which provisions a real app (the translator back end) from
# an overlay in a registry; a client talks to it, then the running app moves
# live to the second cloudlet (found by name through the directory) and
# answers there. Last, the phone walks from one cloudlet to the other and
# back: its back end follows by itself (`cloudlet follow`), with no
# operator command, while a client keeps asking through one local address.
# Prints how long each stage took and why each cloudlet was chosen.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
GUEST=$PWD/target/guest/x86_64-unknown-linux-gnu/release
WORK=$PWD/target/demo
export CLOUDLET_HOME="${CLOUDLET_HOME:-$WORK/home}"
TOKEN=demo-token-$$
mkdir -p "$WORK" "$CLOUDLET_HOME"
# Credentials in a private file (or the environment), never on a command
# line: every user of the host sees those in `ps`.
TOKEN_FILE=$WORK/token
(umask 077 && echo "$TOKEN" >"$TOKEN_FILE")

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
pids=()
wan_pid=
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  # The links last, once nothing uses them.
  if [ -n "$wan_pid" ]; then kill "$wan_pid" 2>/dev/null || true; wait "$wan_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
# Wait up to $1 tenths of a second for the command that follows.
until_ok() { local n=$1; shift; for _ in $(seq "$n"); do "$@" && return 0; sleep 0.1; done; return 1; }

echo "== 0. this machine (cloudlet doctor: stops here, saying what to do, if something is missing)"
$BIN/cloudlet doctor

echo "== 1. base VM 'debian' (built once from Debian packages, then cached)"
t=$(now)
$BIN/cloudlet base build debian
echo "   ($(since "$t"))"

echo "== 2. the app developer packages the translator back end as an overlay"
if [ ! -f "$WORK/translator.overlay" ]; then
  rm -rf "$WORK/translator-app" && mkdir -p "$WORK/translator-app"
  cp "$GUEST/translator" "$WORK/translator-app/"
  "$GUEST/translator" gen-dict --out "$WORK/translator-app/dict.tsv" --entries 1000000
  t=$(now)
  $BIN/cloudlet overlay create --base debian --install "$WORK/translator-app" \
    --run "./translator --port 8080 --dict /opt/app/dict.tsv" --port 8080 --health /health \
    --name translator --work-dir "$WORK" -o "$WORK/translator.overlay"
  echo "   ($(since "$t"))"
else
  echo "   cached: $WORK/translator.overlay"
fi
# The developer signs it (a key made for this run): the registry and the
# cloudlets below take only overlays signed by this key.
rm -f "$WORK/developer.key" "$WORK/developer.key.pub"
$BIN/cloudlet overlay keygen --signer translator-dev -o "$WORK/developer.key" | tail -1
$BIN/cloudlet overlay sign "$WORK/translator.overlay" --key "$WORK/developer.key" --valid-for 1d \
  -o "$WORK/translator.signed.overlay"
# (Into a file first: `| head` would close the pipe under a writer.)
$BIN/cloudlet overlay inspect "$WORK/translator.signed.overlay" >"$WORK/translator.inspect"
head -6 "$WORK/translator.inspect"
printf 'trusted_keys = ["%s"]\nrequire_signed_overlays = true\n' "$(cat "$WORK/developer.key.pub")" >"$WORK/edge.toml"

echo "== 3. the network: the phone's (with the cloud tier: an overlay registry and a directory), and two cloudlets each behind its own link"
# Leftovers of an interrupted earlier run.
$BIN/cloudlet-wan down --prefix demo >/dev/null 2>&1 || true
$BIN/cloudlet-wan up --rate 200 --delay-ms 2,30 --prefix demo >"$WORK/wan.env" 2>"$WORK/wan.log" &
wan_pid=$!
until_ok 100 grep -q WAN_ADDR_B1 "$WORK/wan.env" || { cat "$WORK/wan.log"; exit 1; }
. "$WORK/wan.env"
echo "   phone: namespace $WAN_NS_A; edge-1: $WAN_NS_B (2 ms one way); edge-2: $WAN_NS_B1 (30 ms)"
phone() { ip netns exec "$WAN_NS_A" "$@"; }
# In the background, its pid kept for the clean-up (nsenter execs the
# program: the pid is the program's). nsenter, not `ip netns exec`: that
# one mounts a sysfs of its own, without /sys/fs/cgroup, and the cloudlets'
# QEMUs would be confined without their cgroups' limits.
bg_in() { local ns=$1; shift; nsenter --net="/run/netns/$ns" "$@" & last=$!; pids+=($last); }
REG=$WAN_ADDR_A:7460
DIR=$WAN_ADDR_A:7470
API=$WAN_ADDR_B:7450
API2=$WAN_ADDR_B1:7450
# The fleet's own CA, made for this run, and a certificate for each
# service: every call below is HTTPS, and a handoff mutual TLS.
rm -rf "$WORK/pki"
$BIN/cloudlet pki init --dir "$WORK/pki" --name demo >/dev/null
$BIN/cloudlet pki issue cloud-tier --host "$WAN_ADDR_A" --dir "$WORK/pki" >/dev/null
$BIN/cloudlet pki issue edge-1 --host "$WAN_ADDR_B" --dir "$WORK/pki" >/dev/null
$BIN/cloudlet pki issue edge-2 --host "$WAN_ADDR_B1" --dir "$WORK/pki" >/dev/null
CA=$WORK/pki/ca.pem
export CLOUDLET_CA=$CA
tls_of() { echo "--tls-cert $WORK/pki/$1.pem --tls-key $WORK/pki/$1.key --tls-ca $CA"; }
for e in edge-1 edge-2; do
  { cat "$WORK/edge.toml"; printf '[tls]\ncert = "%s"\nkey = "%s"\nca = "%s"\n' "$WORK/pki/$e.pem" "$WORK/pki/$e.key" "$CA"; } >"$WORK/$e.toml"
done
echo "   a fleet CA for this run ($CA): HTTPS everywhere, mutual TLS between the cloudlets"
rm -rf "$WORK/registry" "$WORK/directory.redb"
bg_in "$WAN_NS_A" $BIN/cloudlet registry serve "$WORK/registry" --listen "0.0.0.0:${REG##*:}" \
  --push-token-file "$TOKEN_FILE" --trusted-key "$WORK/developer.key.pub" --require-signed $(tls_of cloud-tier) >"$WORK/registry.log" 2>&1
bg_in "$WAN_NS_A" $BIN/cloudlet directory serve --listen "0.0.0.0:${DIR##*:}" --store "$WORK/directory.redb" \
  --heartbeat-ms 1000 --lease-ms 3000 $(tls_of cloud-tier) >"$WORK/directory.log" 2>&1
# Two cloudlets 4 km apart in Pittsburgh (same base VMs).
bg_in "$WAN_NS_B" $BIN/cloudletd --config "$WORK/edge-1.toml" --listen "$API" --public-host "$WAN_ADDR_B" --token-file "$TOKEN_FILE" \
  --name edge-1 --directory "https://$DIR" --location "40.4433,-79.9436,CMU campus" >"$WORK/cloudletd.log" 2>&1
mkdir -p "$WORK/home2" && ln -sfn "$CLOUDLET_HOME/bases" "$WORK/home2/bases"
bg_in "$WAN_NS_B1" $BIN/cloudletd --config "$WORK/edge-2.toml" --listen "$API2" --public-host "$WAN_ADDR_B1" --token-file "$TOKEN_FILE" \
  --name edge-2 --home "$WORK/home2" --vm-dir /dev/shm/cloudlet-edge-2 --directory "https://$DIR" \
  --location "40.4406,-79.9959,Downtown" >"$WORK/cloudletd2.log" 2>&1
up() {
  phone curl --cacert "$CA" -sf "https://$API/health" >/dev/null && phone curl --cacert "$CA" -sf "https://$API2/health" >/dev/null \
    && phone curl --cacert "$CA" -sf "https://$REG/health" >/dev/null && phone curl --cacert "$CA" -sf "https://$DIR/v1/health" >/dev/null
}
until_ok 200 up || { tail -5 "$WORK"/*.log; exit 1; }
# Both registered (they do so as they start).
registered() { [ "$(phone curl --cacert "$CA" -sf "https://$DIR/v1/health" | sed -n 's/.*"registered":\([0-9]*\).*/\1/p')" = 2 ]; }
until_ok 50 registered
# What each cloudlet's log says of its VMs' QEMUs (as root: a uid and a cgroup each).
echo "   edge-1: $(sed -n 's/\x1b\[[0-9;]*m//g; s/.*\(QEMU confinement .*\)/\1/p' "$WORK/cloudletd.log" | head -1)"
echo "   dashboards (from the phone's network, e.g. ip netns exec $WAN_NS_A chromium URL): https://$API/ui and https://$API2/ui (each cloudlet, #token=TOKEN), https://$DIR/ui (the fleet)"
export CLOUDLET_URL=https://$API CLOUDLET_TOKEN=$TOKEN
cl() { phone $BIN/cloudlet "$@"; }
# Leftovers of an interrupted earlier run (daemons re-adopt running VMs).
cl vm delete translator >/dev/null 2>&1 || true
cl --cloudlet "https://$API2" vm delete translator >/dev/null 2>&1 || true
cl info
cl registry push "$WORK/translator.signed.overlay" --registry "https://$REG" --name translator --registry-token-file "$TOKEN_FILE"
if cl registry push "$WORK/translator.overlay" --registry "https://$REG" --name unsigned --registry-token-file "$TOKEN_FILE" >"$WORK/unsigned-push.log" 2>&1; then
  echo "an unsigned overlay was accepted by a registry that requires signatures"; exit 1
fi
echo "   (the unsigned one is refused: $(head -1 "$WORK/unsigned-push.log"))"
OVERLAY=https://$REG/v1/overlays/translator

echo "== 4. a phone near CMU finds its cloudlet through the directory and asks it for its translator"
t=$(now)
cl synthesize "$OVERLAY" --name translator --directory "https://$DIR" --near 40.4442,-79.9420
# Where it landed (the directory's choice), and the other cloudlet.
if cl --cloudlet "https://$API" vm show translator >/dev/null 2>&1; then
  here=https://$API; there=edge-2; there_url=https://$API2
else
  here=https://$API2; there=edge-1; there_url=https://$API
fi
export CLOUDLET_URL=$here
endpoint=$(cl vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
answer=$(phone curl -sf "http://$endpoint/translate?text=hello+world+good+morning")
echo "   first answer: $answer"
echo "   request -> first answer: $(since "$t")"

echo "== 5. the operator moves it: the running translator goes live to $there (found through the directory, with its token)"
cl handoff translator --to "$there" --plot "$WORK/handoff.svg"
endpoint2=$(cl --cloudlet "$there_url" vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
echo "   answer at the new cloudlet ($endpoint2): $(phone curl -sf "http://$endpoint2/translate?text=good+night+friend")"
echo "   the first cloudlet keeps a record:"
cl vm list
cl --cloudlet "$there_url" vm delete translator
cl vm delete translator   # the first cloudlet's record of the move

echo "== 6. follow me: the phone starts a session, then walks to edge-2 and back; its back end follows by itself"
# The session: the nearest cloudlet by RTT, a local address that reaches
# the translator wherever it runs, a move when another cloudlet is better
# by 30% and 5 ms for 3 probes in a row (at most one move in 10 s here).
bg_in "$WAN_NS_A" $BIN/cloudlet follow "$OVERLAY" --directory "https://$DIR" --forward 127.0.0.1:8088:8080 \
  --probe-every-ms 1000 --min-interval-s 10 --state "$WORK/session.json" --events 127.0.0.1:8089 \
  >"$WORK/follow.log" 2>&1
follow_pid=$last
until_ok 900 grep -q "^running at" "$WORK/follow.log" || { cat "$WORK/follow.log"; exit 1; }
sed 's/^/   /' "$WORK/follow.log"
# An app on the phone that follows the session's events (server-sent events).
bg_in "$WAN_NS_A" curl -sN http://127.0.0.1:8089/events >"$WORK/session-events.log" 2>&1
# A client that knows only 127.0.0.1:8088 asks every 200 ms and notes how
# long each answer took (an unanswered request is asked again).
bg_in "$WAN_NS_A" bash -c 'while :; do
  s=$(date +%s%N)
  if curl -sf -m 3 -o /dev/null "http://127.0.0.1:8088/translate?text=where+is+the+station"; then
    echo "$s $(( ($(date +%s%N) - s) / 1000000 ))"
  else
    echo "$s fail"
  fi
  sleep 0.2
done' >"$WORK/client.log" 2>&1
client_pid=$last
walk() { # $1: edge-1's one-way delay, $2: edge-2's, $3: where the app should go
  local t
  t=$(now)
  $BIN/cloudlet-wan set --prefix demo --link 0 --delay-ms "$1"
  $BIN/cloudlet-wan set --prefix demo --link 1 --delay-ms "$2"
  echo "   the phone is now $1 ms from edge-1 and $2 ms from edge-2"
  if ! until_ok 1200 grep -q "^moved .* -> $3 " "$WORK/follow.log"; then
    echo "   the translator did not follow to $3:"; cat "$WORK/follow.log"; exit 1
  fi
  grep -E "^(move triggered: .* -> $3|moved .* -> $3 )" "$WORK/follow.log" | tail -2 | sed 's/^/   /'
  echo "   followed $(since "$t") after the walk"
  sleep 3
}
sleep 5
walk 30 2 edge-2
walk 2 30 edge-1
kill "$client_pid"; wait "$client_pid" 2>/dev/null || true
kill -TERM "$follow_pid"; wait "$follow_pid" 2>/dev/null || true
# What the client saw: its answers' times, and its longest wait (from one
# answer to the next).
awk '$2 != "fail" { n++; sum += $2; e = $1 / 1e6 + $2; if (last) { if (e - last > longest) longest = e - last }; last = e }
     $2 == "fail" { failed++ }
     END { printf "   the client: %d answers through 127.0.0.1:8088 (%d asked again), mean %.0f ms; longest wait from one answer to the next %.0f ms\n", n, failed, sum / n, longest }' "$WORK/client.log"
vm_id=$(sed -n 's/.*"vm_id": "\(.*\)".*/\1/p' "$WORK/session.json")
now_at=$(sed -n 's/.*"api_url": "\(.*\)".*/\1/p' "$WORK/session.json")
echo "   what an app following http://127.0.0.1:8089/events saw of the moves:"
grep -o '"event":"move_[a-z]*"[^}]*' "$WORK/session-events.log" | sed 's/^/     /' || true
echo "   the session (kept in $WORK/session.json: resume it with cloudlet follow --attach) ends here; its VM $vm_id runs at $now_at"

echo "== 7. clean up"
cl --cloudlet "$now_at" vm delete "$vm_id"
# The records of the moves on the cloudlets it left.
cl --cloudlet "https://$API" vm delete "$vm_id" >/dev/null 2>&1 || true
cl --cloudlet "https://$API2" vm delete "$vm_id" >/dev/null 2>&1 || true
echo "done"
