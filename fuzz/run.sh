#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 15) on the committed
# corpora. Needs the nightly toolchain and cargo-fuzz (installed if missing).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-15}"
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
for t in bundle path request quota; do
  work="$(mktemp -d)"
  cp -r "corpus/$t/." "$work/" 2>/dev/null || true
  echo "== fuzz $t for ${secs}s"
  # New inputs go to a scratch copy, so the committed corpus stays small;
  # findings go to artifacts/.
  cargo +nightly fuzz run "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 \
    | grep -E "^(#[0-9]+ +DONE|Done|==|SUMMARY|ERROR|panicked|thread)" || true
  if ls "artifacts/$t"/crash-* "artifacts/$t"/leak-* "artifacts/$t"/timeout-* >/dev/null 2>&1; then
    echo "fuzz $t: found a failing input in artifacts/$t" >&2
    exit 1
  fi
done
