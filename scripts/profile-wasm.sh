#!/usr/bin/env bash
# Which of tenantgate.wasm's functions a warm allowed request spends its time
# in: the real module (built with its symbols) in the wasmtime host, one
# request N times (host-tests/examples/wasm_request_loop.rs) under
# `perf record`, the module's functions reported with their callees' time.
# The benchmark's bundle (policies/ with limits raised and `audit: deny`).
#
#   scripts/profile-wasm.sh [N]      # N defaults to 300000
#
# Cranelift's code is not V8's, and the host here is cheaper than Envoy's, so
# read shares of the module's own time, not absolute figures.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-300000}"
command -v perf >/dev/null || { echo "profile-wasm.sh: needs perf (apt-get install linux-perf)" >&2; exit 1; }
out=target/profile-wasm
mkdir -p "$out"
rustup target add wasm32-wasip1 >/dev/null 2>&1 || true
CARGO_PROFILE_RELEASE_STRIP=false cargo build -q -p tenantgate-filter --target wasm32-wasip1 --release \
  --target-dir "$out/build"
wasm="$out/build/wasm32-wasip1/release/tenantgate_filter.wasm"
cargo build -q --release -p tenantgate-host-tests --example wasm_request_loop
rm -rf "$out/tree-bundle"
python3 - "$out" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "envoy")
import bench, harness as h
bench.bench_bundle(h.POLICIES, "bundle", Path(sys.argv[1]))
PY
loop=${CARGO_TARGET_DIR:-target}/release/examples/wasm_request_loop
# The first run compiles the module into the host's cache; the profiled one loads it.
TENANTGATE_HOST_PERFMAP=1 "$loop" "$out/bundle.json" 1000 "$wasm" >/dev/null
TENANTGATE_HOST_PERFMAP=1 perf record -q -g -F 4999 -o "$out/perf.data" "$loop" "$out/bundle.json" "$n" "$wasm"
module=$(perf report -i "$out/perf.data" --sort dso --stdio -g none 2>/dev/null | awk '/\.cwasm/ {print $NF; exit}')
echo "time in the module (of the whole process, host included):"
perf report -i "$out/perf.data" --sort dso --stdio -g none 2>/dev/null | grep '\.cwasm' | head -1
echo "the module's functions, with what they call (top 40):"
perf report -i "$out/perf.data" --children --sort sym --stdio -g none --dsos "$module" 2>/dev/null \
  | grep -v '^#' | grep -v '^$' | sed 's/17h[0-9a-f]\{16\}E//; s/wasm\[0\]::function\[[0-9]*\]:://' | head -40
