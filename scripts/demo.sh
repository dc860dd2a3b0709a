#!/usr/bin/env bash
# The main job: a local cloudlet with the embedded defaults provisions a real
# app (the translator back end) from an overlay in a registry, and a client
# talks to it. Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/target/release
GUEST=$PWD/target/guest/x86_64-unknown-linux-gnu/release
WORK=$PWD/target/demo
export CLOUDLET_HOME="${CLOUDLET_HOME:-$WORK/home}"
TOKEN=demo-token-$$
API=127.0.0.1:7450
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
$BIN/cloudletd --listen $API --token "$TOKEN" >"$WORK/cloudletd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://$API/health" >/dev/null && curl -sf "http://$REG/health" >/dev/null && break
  sleep 0.1
done
export CLOUDLET_URL=http://$API CLOUDLET_TOKEN=$TOKEN
$BIN/cloudlet info
$BIN/cloudlet registry push "$WORK/translator.overlay" --registry "http://$REG" --name translator --registry-token "$TOKEN"

echo "== 4. a phone asks the cloudlet for its translator"
t=$(now)
$BIN/cloudlet synthesize "http://$REG/v1/overlays/translator" --name translator
endpoint=$($BIN/cloudlet vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
answer=$(curl -sf "http://$endpoint/translate?text=hello+world+good+morning")
echo "   first answer: $answer"
echo "   request -> first answer: $(since "$t")"

echo "== 5. clean up"
$BIN/cloudlet vm delete translator
echo "done"
