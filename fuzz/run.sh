#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 15) on the committed
# corpora. Needs the nightly toolchain and cargo-fuzz (installed if missing).
# Exits non-zero when a target does not build, libFuzzer reports a finding
# (crash, leak, timeout, out of memory), or artifacts/ holds a failing input.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-15}"
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in bundle path request quota header_map native; do
  work="$scratch/$t"
  log="$scratch/$t.log"
  mkdir -p "$work"
  cp -r "corpus/$t/." "$work/" 2>/dev/null || true
  echo "== fuzz $t for ${secs}s"
  # New inputs go to a scratch copy, so the committed corpus stays small;
  # findings go to artifacts/. The full log goes to a file, the summary to
  # the terminal, and the exit status is cargo-fuzz's.
  status=0
  cargo +nightly fuzz run "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 \
    >"$log" 2>&1 || status=$?
  grep -E "^(#[0-9]+ +DONE|Done|==|SUMMARY|ERROR|error|panicked|thread)" "$log" || true
  if [ "$status" -ne 0 ]; then
    echo "fuzz $t: cargo fuzz failed (exit $status): the target did not build or libFuzzer found a failing input; the end of its log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  if ls "artifacts/$t"/crash-* "artifacts/$t"/leak-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* >/dev/null 2>&1; then
    echo "fuzz $t: found a failing input in artifacts/$t" >&2
    exit 1
  fi
done
