#!/usr/bin/env bash
# Builds the native build, libtenantgate.so (profile `native`: release at
# opt-level 3; an Envoy 1.40 dynamic
# module, ABI v0.2.0), and puts it at dist/libtenantgate.so.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p tenantgate-native --profile native
mkdir -p dist
cp "${CARGO_TARGET_DIR:-target}/native/libtenantgate.so" dist/libtenantgate.so
size=$(stat -c %s dist/libtenantgate.so)
echo "dist/libtenantgate.so: $size bytes (ABI $(strings dist/libtenantgate.so | grep -m1 -x 'v0\.[0-9]*\.[0-9]*'))"
