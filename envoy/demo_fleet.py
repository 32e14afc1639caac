#!/usr/bin/env python3
"""The fleet demo: one tenant's requests spread over three real Envoys, refused at
the fleet limit, not at three times it; then hierarchical quotas for the whole
fleet (mode `assigned`). Run it through scripts/demo-fleet.sh, which builds
the filter, the CLI and tenantgate-rls first.

    python3 envoy/demo_fleet.py

A Redis, a `tenantgate-rls` and three Envoys (rendered by `tenantgate envoy
--rls`) load one bundle: the example tree plus `/fleet`, whose fleet limit
`rpm` allows 30 requests a minute across the fleet. Then another set loads
testdata/fleet-assigned/ (`/` 60/s for the fleet; `/a` rate 40/s, ceil
60/s; `/b` rate 20/s) with traffic spread 70/20/10 over the Envoys: `/a`
borrows up to its ceil while `/b` is idle, then each gets its rate. Exits 0
when every count is what the narration says (the assigned figures within
5%), 1 otherwise.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
from fleet_test import FLEET_RATE, WHO, Fleet, Redis, Rls, render, statuses  # noqa: E402
from fleet_assigned_test import TREE, Load, origin  # noqa: E402

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
    assigned(expect, failures)
    print()
    if failures:
        print(f"demo-fleet: {len(failures)} unexpected: {', '.join(failures)}")
        return 1
    print("demo-fleet: every answer as narrated")
    return 0


def assigned(expect, failures):
    """Part 3: mode `assigned` on testdata/fleet-assigned/."""
    work = h.tempdir("tenantgate-demo-assigned-")
    bundle = work / "bundle.json"
    h.make_bundle(TREE, bundle)
    limits = {t: json.loads((TREE / "tenants" / t / "tenant.json").read_text())["limits"]["rps"]
              for t in ("", "a", "b")}
    print(f"\n{BOLD}3. Mode \"assigned\": hierarchical quotas for the whole fleet{RESET}")
    for t in ("", "a", "b"):
        print(f"{DIM}   testdata/fleet-assigned/tenants/{t + '/' if t else ''}tenant.json: "
              f"\"rps\": {json.dumps(limits[t])}{RESET}")
    print("   Each Envoy worker reports its usage to tenantgate-rls every 500 ms over one RLQS stream and")
    print("   enforces the rate it is assigned in memory: no call on the request path. The service divides")
    print("   the fleet's 60/s down the tree (HTB) and among the workers (by their demand).")
    redis = Redis(work).start()
    upstream = origin(work).start()
    rls_port = h.free_port()
    rls = Rls(bundle, redis.url, work, rls_port).start()
    envoys = []
    try:
        for i in range(3):
            envoys.append(render(bundle, work, f"envoy{i}", upstream.listen_port, rls_port).start())
        flows = [
            {"tenant": "/a", "rps": 100, "from_s": 0, "to_s": 14, "spread": [70, 20, 10], "principal": "ann"},
            {"tenant": "/b", "rps": 80, "from_s": 7, "to_s": 14, "spread": [10, 20, 70], "principal": "bob"},
        ]
        print("   /a sends 100/s (70/20/10 over the Envoys); from 7 s /b sends 80/s (10/20/70)")
        load = Load(envoys, flows, time.monotonic())
        load.join()

        def near(what, got, want):
            ok = abs(got - want) <= 0.05 * want
            print(f"   {what}: {got} {DIM}(expected {want:.0f} +-5%: {'ok' if ok else 'UNEXPECTED'}){RESET}")
            if not ok:
                failures.append(what)

        alone, both = load.count(3, 7), load.count(10, 14)
        near("/a alone, admitted in 4 s (borrows up to its ceil, 60/s)", alone[("/a", 200)], 240)
        near("/a beside /b, admitted in 4 s (its rate, 40/s)", both[("/a", 200)], 160)
        near("/b beside /a, admitted in 4 s (its rate, 20/s)", both[("/b", 200)], 80)
        per_envoy = [sum(1 for at, t, i, s in load.rows if 10 <= at < 14 and s == 200 and i == n)
                     for n in range(3)]
        print(f"   admitted per Envoy in the last 4 s: {per_envoy} (each worker's share follows its demand)")
        calls = sum(e.counter(f"{h.stat_namespace()}.tenantgate.fleet_calls") or 0 for e in envoys)
        sent = len(load.rows)
        print(f"   {sent} requests, {calls} usage reports (tenantgate.fleet_calls): per worker and interval, "
              f"not per request")
        expect("reports fewer than a fifth of the requests", calls < sent / 5, True)
    finally:
        for e in envoys:
            e.stop()
        rls.stop()
        upstream.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
