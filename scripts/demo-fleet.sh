#!/usr/bin/env bash
# The fleet demo: a fleet limit holding across three real Envoys, then
# hierarchical quotas for the whole fleet (mode `assigned`: guarantee and
# borrowing across Envoys, testdata/fleet-assigned/), narrated.
#
#   scripts/demo-fleet.sh    # build, run, stop; exit 0 if every count is as narrated
#
# Builds dist/tenantgate.wasm, the CLI and tenantgate-rls, installs Envoy
# (scripts/install-envoy.sh) and redis-server (scripts/install-redis.sh) if
# missing, then runs envoy/demo_fleet.py: Redis, tenantgate-rls and three
# Envoys on 127.0.0.1 (twice), all stopped at the end. About 40 s.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[2m%s\033[0m\n' "demo-fleet.sh: $*" >&2; }
step "building the filter, the CLI and tenantgate-rls"
scripts/build-wasm.sh >&2
cargo build -q -p tenantgate-cli -p tenantgate-rls
step "installing Envoy and redis-server if missing"
scripts/install-envoy.sh
scripts/install-redis.sh
export TENANTGATE_CLI="$PWD/target/debug/tenantgate"
exec python3 envoy/demo_fleet.py "$@"
