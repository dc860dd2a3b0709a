#!/usr/bin/env bash
# The main job: build the base VMs, then show a saved app coming back in
# under a second where a cold boot takes ten.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
export CLOUDLET_HOME="${CLOUDLET_HOME:-$PWD/target/demo-home}"
echo "== base VMs (cached in $CLOUDLET_HOME, keyed by their inputs)"
$BIN/cloudlet base build tiny
$BIN/cloudlet base build debian
$BIN/cloudlet base list
echo "== cold boot vs restore of an app (kvstore) on each base"
$BIN/restore-bench --runs 2
