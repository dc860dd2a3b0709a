#!/bin/sh
# Realistic app overlays on the `debian` base (issue 3, item 5):
#
#   kvstore.overlay     the kvstore static binary
#   translator.overlay  the translator binary + a generated 1M-entry dictionary
#   numpy.overlay       Python 3 + numpy from Debian's packages, installed in the
#                       guest, and a small HTTP service filtering an image
#
# Usage: scripts/make-overlays.sh [OUT_DIR] [APP...]
#   OUT_DIR  default target/overlays; launch images are kept in OUT_DIR/launch/APP
#            (for bench/src/bin/overlay-bench.rs)
#   APP      kvstore translator numpy (default: all)
# Environment: CLOUDLET (the CLI, default target/release/cloudlet),
#              CLOUDLET_HOME (the base store), BASE (default debian),
#              WORK_DIR (temporary VM files, default /var/tmp), FORCE=1 (rebuild).
#
# An overlay whose inputs (app files, commands, base id) are unchanged is not
# rebuilt.
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-target/overlays}
[ $# -gt 0 ] && shift
APPS=${*:-kvstore translator numpy}
CLOUDLET=${CLOUDLET:-target/release/cloudlet}
BASE=${BASE:-debian}
WORK_DIR=${WORK_DIR:-/var/tmp}
GUEST=target/guest/x86_64-unknown-linux-gnu/release
mkdir -p "$OUT/src" "$OUT/launch"

[ -x "$CLOUDLET" ] || { echo "$CLOUDLET missing: cargo build --release -p cloudlet-cli" >&2; exit 1; }
BASE_ID=$("$CLOUDLET" base show "$BASE" --output json | sed -n 's/^  "id": "\(.*\)",$/\1/p')
[ -n "$BASE_ID" ] || { echo "base $BASE not built: $CLOUDLET base build $BASE" >&2; exit 1; }

# make APP DIR PORT HEALTH RUN [--install-cmd CMD]...
make_overlay() {
    app=$1 dir=$2 port=$3 health=$4 run=$5
    shift 5
    inputs=$( (echo "$BASE_ID $port $health $run $*"; cd "$dir" && find . -type f | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)
    if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/$app.overlay" ] && [ -f "$OUT/launch/$app/state" ] \
        && [ "$(cat "$OUT/$app.inputs" 2>/dev/null)" = "$inputs" ]; then
        echo "== $app.overlay is up to date"
        return
    fi
    echo "== packaging $app"
    rm -rf "$OUT/launch/$app"
    "$CLOUDLET" overlay create --base "$BASE" --install "$dir" --name "$app" \
        --port "$port" --health "$health" --run "$run" "$@" \
        --work-dir "$WORK_DIR" --keep-launch "$OUT/launch/$app" -o "$OUT/$app.overlay"
    echo "$inputs" > "$OUT/$app.inputs"
}

for app in $APPS; do
    case $app in
    kvstore)
        d=$OUT/src/kvstore
        mkdir -p "$d"
        cp "$GUEST/kvstore" "$d/kvstore"
        make_overlay kvstore "$d" 8080 /health "./kvstore --port 8080"
        ;;
    translator)
        d=$OUT/src/translator
        mkdir -p "$d"
        cp "$GUEST/translator" "$d/translator"
        [ -f "$d/dict.tsv" ] || "$GUEST/translator" gen-dict --out "$d/dict.tsv" --entries 1000000
        make_overlay translator "$d" 8080 /health "./translator --port 8080 --dict /opt/app/dict.tsv"
        ;;
    numpy)
        d=$OUT/src/numpy
        mkdir -p "$d"
        cp scripts/overlay-apps/numpy/app.py scripts/overlay-apps/numpy/gen_data.py "$d/"
        make_overlay numpy "$d" 8080 /health "python3 app.py 8080" \
            --install-cmd "apt-get update && apt-get install -y --no-install-recommends python3-numpy && apt-get clean && rm -rf /var/lib/apt/lists/*" \
            --install-cmd "python3 gen_data.py"
        ;;
    *) echo "unknown app $app" >&2; exit 1 ;;
    esac
done
ls -l "$OUT"/*.overlay
