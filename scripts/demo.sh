#!/usr/bin/env bash
# The main job: a local cloudlet with the embedded defaults provisions a real
# app (the translator back end) from an overlay in a registry, a client talks
# to it, then the running app moves live to a second cloudlet and answers
# there. Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
GUEST=$PWD/target/guest/x86_64-unknown-linux-gnu/release
WORK=$PWD/target/demo
export CLOUDLET_HOME="${CLOUDLET_HOME:-$WORK/home}"
TOKEN=demo-token-$$
API=127.0.0.1:7450
API2=127.0.0.1:7451
REG=127.0.0.1:7460
mkdir -p "$WORK" "$CLOUDLET_HOME"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== 0. this machine (cloudlet doctor: stops here, saying what to do, if something is missing)"
$BIN/cloudlet doctor --ports "${API##*:},${API2##*:},${REG##*:}"

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
$BIN/cloudlet overlay inspect "$WORK/translator.overlay" | head -12

echo "== 3. the cloud tier: an overlay registry; the edge: a cloudlet (embedded defaults)"
rm -rf "$WORK/registry"
$BIN/cloudlet registry serve "$WORK/registry" --listen $REG --push-token "$TOKEN" >"$WORK/registry.log" 2>&1 &
pids+=($!)
$BIN/cloudletd --listen $API --token "$TOKEN" --name edge-1 >"$WORK/cloudletd.log" 2>&1 &
pids+=($!)
# A second cloudlet next door (same base VMs), for the handoff.
mkdir -p "$WORK/home2" && ln -sfn "$CLOUDLET_HOME/bases" "$WORK/home2/bases"
$BIN/cloudletd --listen $API2 --token "$TOKEN" --name edge-2 --home "$WORK/home2" \
  --vm-dir /dev/shm/cloudlet-edge-2 >"$WORK/cloudletd2.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://$API/health" >/dev/null && curl -sf "http://$API2/health" >/dev/null \
    && curl -sf "http://$REG/health" >/dev/null && break
  sleep 0.1
done
export CLOUDLET_URL=http://$API CLOUDLET_TOKEN=$TOKEN
# Leftovers of an interrupted earlier run (daemons re-adopt running VMs).
$BIN/cloudlet vm delete translator >/dev/null 2>&1 || true
$BIN/cloudlet --cloudlet "http://$API2" vm delete translator >/dev/null 2>&1 || true
$BIN/cloudlet info
$BIN/cloudlet registry push "$WORK/translator.overlay" --registry "http://$REG" --name translator --registry-token "$TOKEN"

echo "== 4. a phone asks the cloudlet for its translator"
t=$(now)
$BIN/cloudlet synthesize "http://$REG/v1/overlays/translator" --name translator
endpoint=$($BIN/cloudlet vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
answer=$(curl -sf "http://$endpoint/translate?text=hello+world+good+morning")
echo "   first answer: $answer"
echo "   request -> first answer: $(since "$t")"

echo "== 5. the user moves: the running translator follows, live, to the next cloudlet"
$BIN/cloudlet handoff translator --to "http://$API2" --dest-token "$TOKEN"
endpoint2=$($BIN/cloudlet --cloudlet "http://$API2" vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
echo "   answer at the new cloudlet ($endpoint2): $(curl -sf "http://$endpoint2/translate?text=good+night+friend")"
echo "   the first cloudlet keeps a record:"
$BIN/cloudlet vm list

echo "== 6. clean up"
$BIN/cloudlet --cloudlet "http://$API2" vm delete translator
$BIN/cloudlet vm delete translator   # the first cloudlet's record of the move
echo "done"
