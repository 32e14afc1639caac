#!/usr/bin/env python3
"""The fleet demo: one tenant's requests spread over three real Envoys, refused at
the fleet limit, not at three times it. Run it through scripts/demo-fleet.sh,
which builds the filter, the CLI and tenantgate-rls first.

    python3 envoy/demo_fleet.py

A Redis, a `tenantgate-rls` and three Envoys (rendered by `tenantgate envoy
--rls`) load one bundle: the example tree plus `/fleet`, whose fleet limit
`rpm` allows 30 requests a minute across the fleet. Exits 0 when every count
is what the narration says, 1 otherwise.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
from fleet_test import FLEET_RATE, WHO, Fleet, statuses  # noqa: E402

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def main():
    failures = []

    def expect(what, got, want):
        mark = "ok" if got == want else "UNEXPECTED"
        print(f"   {what}: {got} {DIM}(expected {want}: {mark}){RESET}")
        if got != want:
            failures.append(what)

    fleet = Fleet("demo")
    print(f"{BOLD}Starting Redis, tenantgate-rls and three Envoys on one bundle{RESET}")
    fleet.start()
    try:
        print(f"{DIM}   Redis on 127.0.0.1:{fleet.redis.port}; tenantgate-rls on 127.0.0.1:{fleet.rls_port}; "
              f"Envoys listening on {', '.join(str(e.listen_port) for e in fleet.envoys)}{RESET}")
        print(f"{DIM}   /fleet/tenant.json: \"rpm\": {{\"rate\": {FLEET_RATE}, \"per\": \"1m\", "
              f"\"scope\": \"fleet\"}}; tenantgate.json: \"rate_limit_service\": "
              f"{{\"cluster\": \"tenantgate_rls\", \"mode\": \"per_request\"}}{RESET}\n")

        print(f"{BOLD}1. {3 * FLEET_RATE} requests from /fleet, round robin over the three Envoys{RESET}")
        print("   Each Envoy asks the rate limit service before letting a request through; the service")
        print("   counts in Redis with one atomic script, so the fleet admits the limit once.")
        rs = fleet.spread(3 * FLEET_RATE)
        per_envoy = [statuses(rs[i::3]).get(200, 0) for i in range(3)]
        expect("admitted by the fleet", statuses(rs).get(200, 0), FLEET_RATE)
        expect("refused with 429", statuses(rs).get(429, 0), 2 * FLEET_RATE)
        print(f"   admitted per Envoy: {per_envoy} (a per-process limit would have admitted "
              f"{FLEET_RATE} on each: {3 * FLEET_RATE})")
        refused = next(r for r in rs if r.status == 429)
        for k in ("retry-after", "ratelimit-policy", "ratelimit"):
            print(f"   {DIM}{k}: {refused.headers.get(k)}{RESET}")
        print(f"   {DIM}{refused.body.decode(errors='replace').strip()}{RESET}")
        expect("the refusing limit", refused.json().get("limit"), "rpm")
        expect("the service's counter in Redis", fleet.redis.count("/fleet", "rpm"), FLEET_RATE)
        calls = fleet.counter("tenantgate.fleet_calls")
        expect("calls to the service (tenantgate.fleet_calls, all Envoys)", calls, 3 * FLEET_RATE)

        print(f"\n{BOLD}2. The service stops: on_error \"allow\" keeps traffic flowing, and counts it{RESET}")
        fleet.rls.stop()
        fleet.redis.flush()
        rs = fleet.spread(3)
        expect("statuses while the service is down", statuses(rs), {200: 3})
        expect("tenantgate.fleet_errors", fleet.counter("tenantgate.fleet_errors"), 3)
    finally:
        fleet.stop()
    print()
    if failures:
        print(f"demo-fleet: {len(failures)} unexpected: {', '.join(failures)}")
        return 1
    print("demo-fleet: every answer as narrated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
