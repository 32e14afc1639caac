#!/usr/bin/env bash
# Quick-start command 2: every test. Builds tenantgate.wasm and
# libtenantgate.so first (the host tests, `tenantgate envoy`'s tests and the
# Envoy tests load them), then runs the Rust tests, the example
# tree's policy tests, and the end-to-end tests against real Envoy.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== build tenantgate.wasm and libtenantgate.so"
./scripts/build-wasm.sh
./scripts/build-native.sh

echo "== cargo test (engine, cli, filter, native, host-tests)"
cargo test --workspace

echo "== tenantgate-rls against a real Redis (scripts/test-rls.sh)"
./scripts/test-rls.sh

echo "== policies/: validate, formatting and policy tests"
cargo run -q -p tenantgate-cli -- validate policies
cargo run -q -p tenantgate-cli -- fmt policies --check
cargo run -q -p tenantgate-cli -- test policies

if [ -x scripts/test-envoy.sh ]; then
  echo "== end-to-end tests in real Envoy"
  ./scripts/test-envoy.sh
fi

echo "== observability: promtool checks and rule tests, Envoy + Prometheus live test"
./scripts/test-observability.sh
echo "== all tests passed"
