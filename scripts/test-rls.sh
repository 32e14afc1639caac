#!/usr/bin/env bash
# Integration tests of tenantgate-rls (rls/tests/) against a real Redis.
#
#   scripts/test-rls.sh                    # all of them
#   scripts/test-rls.sh reports            # cargo test name filters pass through
#
# Installs redis-server from Debian when missing, starts one on a free
# loopback port (no persistence, in a temp folder), runs the crate's tests,
# the Redis ones included (they are #[ignore]d in a plain `cargo test`:
# without TENANTGATE_TEST_REDIS they would fail), and stops Redis on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-redis.sh

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
  --daemonize no --logfile "$dir/redis.log" &
redis_pid=$!
cleanup() {
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null || { echo "redis-server did not start:" >&2; cat "$dir/redis.log" >&2; exit 1; }

export TENANTGATE_TEST_REDIS="redis://127.0.0.1:$port/"
echo "== tenantgate-rls tests against $TENANTGATE_TEST_REDIS" >&2
cargo test -p tenantgate-rls -- --include-ignored "$@"
