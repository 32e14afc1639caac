#!/usr/bin/env bash
# The shipped observability files (envoy/observability/) tested for real:
# promtool checks the scrape config and the rules and runs the rules' unit
# tests, then envoy/observability_test.py runs real Envoy with tenantgate and
# a real Prometheus scraping it (every dashboard query returns data, the
# near-limit alert fires), once with the native build and once with the Wasm
# filter. Installs Debian's `prometheus` (Prometheus and promtool) when
# missing. About 45 s.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "== installing prometheus (Debian package)" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi

obs=envoy/observability
promtool check config "$obs/prometheus.yml"
promtool check rules "$obs/tenantgate.rules.yml"
(cd "$obs" && promtool test rules tenantgate.rules.test.yml)

# The live test needs both builds, the CLI and Envoy.
[ -f dist/tenantgate.wasm ] || scripts/build-wasm.sh >&2
[ -f dist/libtenantgate.so ] || scripts/build-native.sh >&2
if [ -z "${TENANTGATE_CLI:-}" ]; then
  cargo build -q -p tenantgate-cli
  target="${CARGO_TARGET_DIR:-target}"
  case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
  export TENANTGATE_CLI="$target/debug/tenantgate"
fi
scripts/install-envoy.sh
TENANTGATE_BUILD=native python3 envoy/observability_test.py "$@"  # the native build
exec python3 envoy/observability_test.py "$@"
