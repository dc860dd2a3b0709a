#!/usr/bin/env bash
# The main job: two local cloudlets with the embedded defaults register in a
# directory; a phone finds its cloudlet through the directory, which
# provisions a real app (the translator back end) from an overlay in a
# registry; a client talks to it, then the running app moves live to the
# second cloudlet (found by name through the directory) and answers there.
# Prints how long each stage took and why the cloudlet was chosen.
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
DIR=127.0.0.1:7470
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
$BIN/cloudlet doctor --ports "${API##*:},${API2##*:},${REG##*:},${DIR##*:}"

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
# (Into a file first: `| head` would close the pipe under a writer.)
$BIN/cloudlet overlay inspect "$WORK/translator.overlay" >"$WORK/translator.inspect"
head -12 "$WORK/translator.inspect"

echo "== 3. the cloud tier: an overlay registry and a directory; the edge: two cloudlets that join it"
rm -rf "$WORK/registry" "$WORK/directory.redb"
$BIN/cloudlet registry serve "$WORK/registry" --listen $REG --push-token "$TOKEN" >"$WORK/registry.log" 2>&1 &
pids+=($!)
$BIN/cloudlet directory serve --listen $DIR --store "$WORK/directory.redb" >"$WORK/directory.log" 2>&1 &
pids+=($!)
# Two cloudlets 4 km apart in Pittsburgh (same base VMs).
$BIN/cloudletd --listen $API --token "$TOKEN" --name edge-1 --directory "http://$DIR" \
  --location "40.4433,-79.9436,CMU campus" >"$WORK/cloudletd.log" 2>&1 &
pids+=($!)
mkdir -p "$WORK/home2" && ln -sfn "$CLOUDLET_HOME/bases" "$WORK/home2/bases"
$BIN/cloudletd --listen $API2 --token "$TOKEN" --name edge-2 --home "$WORK/home2" \
  --vm-dir /dev/shm/cloudlet-edge-2 --directory "http://$DIR" \
  --location "40.4406,-79.9959,Downtown" >"$WORK/cloudletd2.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -sf "http://$API/health" >/dev/null && curl -sf "http://$API2/health" >/dev/null \
    && curl -sf "http://$REG/health" >/dev/null && curl -sf "http://$DIR/v1/health" >/dev/null && break
  sleep 0.1
done
# Both registered (they do so as they start).
for _ in $(seq 50); do
  [ "$(curl -sf "http://$DIR/v1/health" | sed -n 's/.*"registered":\([0-9]*\).*/\1/p')" = 2 ] && break
  sleep 0.1
done
export CLOUDLET_URL=http://$API CLOUDLET_TOKEN=$TOKEN
# Leftovers of an interrupted earlier run (daemons re-adopt running VMs).
$BIN/cloudlet vm delete translator >/dev/null 2>&1 || true
$BIN/cloudlet --cloudlet "http://$API2" vm delete translator >/dev/null 2>&1 || true
$BIN/cloudlet info
$BIN/cloudlet registry push "$WORK/translator.overlay" --registry "http://$REG" --name translator --registry-token "$TOKEN"

echo "== 4. a phone near CMU finds its cloudlet through the directory and asks it for its translator"
t=$(now)
$BIN/cloudlet synthesize "http://$REG/v1/overlays/translator" --name translator \
  --directory "http://$DIR" --near 40.4442,-79.9420
# Where it landed (the directory's choice), and the other cloudlet.
if $BIN/cloudlet --cloudlet "http://$API" vm show translator >/dev/null 2>&1; then
  here=http://$API; there=edge-2; there_url=http://$API2
else
  here=http://$API2; there=edge-1; there_url=http://$API
fi
export CLOUDLET_URL=$here
endpoint=$($BIN/cloudlet vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
answer=$(curl -sf "http://$endpoint/translate?text=hello+world+good+morning")
echo "   first answer: $answer"
echo "   request -> first answer: $(since "$t")"

echo "== 5. the user moves: the running translator follows, live, to $there (found through the directory, with its token)"
$BIN/cloudlet handoff translator --to "$there"
endpoint2=$($BIN/cloudlet --cloudlet "$there_url" vm show translator --output json | sed -n 's/.*"endpoint": "\(.*\)".*/\1/p' | head -1)
echo "   answer at the new cloudlet ($endpoint2): $(curl -sf "http://$endpoint2/translate?text=good+night+friend")"
echo "   the first cloudlet keeps a record:"
$BIN/cloudlet vm list

echo "   what the directory tells a phone now (the translator's overlay is cached at $there):"
$BIN/cloudlet discover --directory "http://$DIR" --base debian \
  --overlay "http://$REG/v1/overlays/translator" --near 40.4442,-79.9420 | sed 's/^/   /'

echo "== 6. clean up"
$BIN/cloudlet --cloudlet "$there_url" vm delete translator
$BIN/cloudlet vm delete translator   # the first cloudlet's record of the move
echo "done"
