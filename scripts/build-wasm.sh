#!/usr/bin/env bash
# Builds tenantgate.wasm (release, wasm32-wasip1) and puts it at dist/tenantgate.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
cargo build -q -p tenantgate-filter --target wasm32-wasip1 --release
mkdir -p dist
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip1/release/tenantgate_filter.wasm" dist/tenantgate.wasm
size=$(stat -c %s dist/tenantgate.wasm)
echo "dist/tenantgate.wasm: $size bytes"
if [ "$size" -gt $((3 * 1024 * 1024)) ]; then
  echo "error: tenantgate.wasm is larger than 3 MiB" >&2
  exit 1
fi
