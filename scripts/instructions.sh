#!/usr/bin/env bash
# Instructions the engine spends on one allowed request, natively, counted by
# callgrind (deterministic: the same count on a busy or an idle machine).
# Runs engine/examples/request_loop.rs with N and 2N requests and prints the
# difference divided by N, so setup (bundle compilation) cancels out.
#
#   scripts/instructions.sh [N]      # N defaults to 20000
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20000}"
command -v valgrind >/dev/null || { echo "instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release -p tenantgate-engine --example request_loop
bin=${CARGO_TARGET_DIR:-target}/release/examples/request_loop
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" 2>&1 \
    | sed -n 's/.*I *refs: *//p' | tr -d ','
}
a=$(count "$n"); b=$(count $((2 * n)))
echo "instructions per allowed request: $(( (b - a) / n )) (callgrind, $n and $((2 * n)) requests)"
