#!/usr/bin/env python3
"""Fleet limits across three real Envoys, a real Redis and `tenantgate-rls`.

One bundle (the example tree with tenants `/fleet` and `/tight` added) is
loaded by three Envoys, rendered by `tenantgate envoy --rls`, and by one
`tenantgate-rls` counting in one `redis-server`. `/fleet` has a roomy local
`rps` and a fleet `rpm` of 30 per minute; `/tight` a local `rps` of burst 20
(1/s) and a fleet `rpm` of 10. The tests send one tenant's requests over the
three proxies and check:

- `per_request`: the fleet admits exactly the limit, not three times it, and
  refuses the rest with 429 and the RateLimit fields of the fleet limit; the
  local tokens of refused requests go back (the local limit never refuses);
- `batched`: no call per request (the calls follow the report interval), the
  fleet total stays within the documented bound;
- the service (or Redis) stopped: `on_error` decides within the timeout,
  Envoy keeps serving, the error counter moves; back: enforcement resumes;
- a service that never answers: `on_error: "deny"` answers 503 after
  `timeout_ms`, a request body waits with its headers; a client that leaves
  while its check is pending gives its local tokens back.

    python3 envoy/fleet_test.py [-v]

Needs `redis-server` (scripts/test-fleet.sh installs it) and the
`tenantgate-rls` binary (`cargo build -p tenantgate-rls`).
"""

import json
import os
import subprocess
import sys
import time
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402

WORK = h.tempdir("tenantgate-fleet-")
FLEET_RATE = 30
TIGHT_FLEET, TIGHT_BURST = 10, 20
WHO = {"x-tenant": "/fleet", "x-user": "fay", "x-user-tenant": "/fleet"}
TIGHT = {"x-tenant": "/tight", "x-user": "tim", "x-user-tenant": "/tight"}
SLOW = {"x-tenant": "/slow", "x-user": "sam", "x-user-tenant": "/slow"}


def rls_binary():
    return Path(os.environ.get("TENANTGATE_RLS") or h.REPO / "target" / "debug" / "tenantgate-rls")


class Redis:
    def __init__(self, workdir):
        self.port = h.free_port()
        self.dir = Path(workdir) / f"redis-{self.port}"
        self.proc = None

    def start(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        h.wait_port(self.port, 10, self.proc, "redis-server")
        return self

    def stop(self):
        h._stop(self.proc)

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, check=True).stdout

    def flush(self):
        self.cli("flushall")

    def count(self, tenant, limit):
        """The service's counter of one fleet limit (0 when absent)."""
        keys = [k for k in self.cli("--scan", "--pattern", f"*:{tenant}:{limit}:*").split() if k]
        return sum(int(self.cli("get", k).strip() or 0) for k in keys)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/"


class Rls:
    """`tenantgate-rls` on a loopback port."""

    def __init__(self, bundle, redis_url, workdir, port):
        self.bundle, self.redis_url, self.port = bundle, redis_url, port
        self.log_path = Path(workdir) / "rls.log"
        self.proc = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(rls_binary()), "--bundle", str(self.bundle), "--redis", self.redis_url,
                 "--listen", f"127.0.0.1:{self.port}"], stdout=log, stderr=log)
        h.wait_port(self.port, 20, self.proc, "tenantgate-rls")
        return self

    def stop(self):
        h._stop(self.proc)


def fleet_policies(dest, **rls):
    """The example tree plus `/fleet` and `/tight`; `rls` edits `rate_limit_service`."""
    d = h.copy_policies(dest)
    for name, limits in [
        ("fleet", {"rps": {"rate": 100, "burst": 400},
                   "rpm": {"rate": FLEET_RATE, "per": "1m", "scope": "fleet"}}),
        ("tight", {"rps": {"rate": 1, "burst": TIGHT_BURST},
                   "rpm": {"rate": TIGHT_FLEET, "per": "1m", "scope": "fleet"}}),
        # A local limit whose RateLimit field shows every token (q = 20).
        ("slow", {"minute": {"rate": 20, "per": "1m"},
                  "rpm": {"rate": 1000, "per": "1m", "scope": "fleet"}}),
    ]:
        t = d / "tenants" / name
        t.mkdir()
        (t / "tenant.json").write_text(json.dumps({"limits": limits}, indent=2) + "\n")
        (t / "members.cedar").write_text(
            f'@id("{name}-members")\npermit (principal in Tenant::"/{name}", action, '
            f'resource in Tenant::"/{name}");\n')
    h.edit_settings(d, rate_limit_service=dict({"cluster": "tenantgate_rls", "timeout_ms": 200}, **rls))
    bundle = Path(dest).parent / "bundle.json"
    h.make_bundle(d, bundle)
    return bundle


def render(bundle, workdir, name, upstream_port, rls_port, concurrency=2):
    listen, admin = h.free_port(), h.free_port()
    out = Path(workdir) / f"{name}.json"
    cmd = h.cli_command() + ["envoy", str(bundle), *h.module_args(),
                             "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
                             "--upstream", f"127.0.0.1:{upstream_port}", "--rls", f"127.0.0.1:{rls_port}",
                             "-o", str(out)]
    proc = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr}")
    return h.Envoy(out.read_text(), workdir, name=name, concurrency=concurrency, admin_port=admin,
                   listen_port=listen)


class Fleet:
    """Redis, tenantgate-rls and three Envoys on one bundle."""

    def __init__(self, name, **rls):
        self.work = WORK / name
        self.work.mkdir(parents=True)
        self.bundle = fleet_policies(self.work / "policies", **rls)
        self.redis = Redis(self.work)
        self.upstream = h.Upstream()
        self.rls_port = h.free_port()
        self.rls = None
        self.envoys = []

    def start(self):
        self.redis.start()
        self.upstream.start()
        self.rls = Rls(self.bundle, self.redis.url, self.work, self.rls_port).start()
        for i in range(3):
            self.envoys.append(render(self.bundle, self.work, f"envoy{i}", self.upstream.port,
                                      self.rls_port).start())
        return self

    def stop(self):
        for e in self.envoys:
            e.stop()
        if self.rls:
            self.rls.stop()
        self.upstream.stop()
        self.redis.stop()

    def spread(self, n, who=WHO, pace_s=0.0):
        """`n` GETs, round robin over the three Envoys, one every `pace_s`."""
        out, start = [], time.monotonic()
        for i in range(n):
            if pace_s:
                delay = start + i * pace_s - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            out.append(self.envoys[i % 3].request("GET", "/items", who))
        return out

    def answers_again(self, timeout):
        """Waits until a request is checked with no fleet error (the service or
        Redis back); returns whether it happened within `timeout` seconds."""
        def answered():
            before = self.counter("tenantgate.fleet_errors")
            return self.spread(1)[0].status == 200 and self.counter("tenantgate.fleet_errors") == before

        return h.wait_for(answered, timeout)

    def counter(self, name):
        """A filter counter (`tenantgate.fleet_calls`) summed over the Envoys."""
        return sum(e.counter(f"{h.stat_namespace()}." + name) or 0 for e in self.envoys)


def statuses(responses):
    out = {}
    for r in responses:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def limits_of(responses, status=429):
    return [r.json().get("limit") for r in responses if r.status == status]


class PerRequest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fleet = Fleet("per-request").start()

    @classmethod
    def tearDownClass(cls):
        cls.fleet.stop()

    def setUp(self):
        self.fleet.redis.flush()

    def test_the_fleet_admits_the_limit_once_not_once_per_envoy(self):
        calls = self.fleet.counter("tenantgate.fleet_calls")
        rs = self.fleet.spread(3 * FLEET_RATE)
        counts = statuses(rs)
        print(f"\n  per_request: {3 * FLEET_RATE} requests over 3 Envoys, fleet limit {FLEET_RATE}/min: "
              f"{counts}", file=sys.stderr)
        self.assertEqual(counts, {200: FLEET_RATE, 429: 2 * FLEET_RATE})
        self.assertEqual(self.fleet.redis.count("/fleet", "rpm"), FLEET_RATE)
        # One call per request the local limits admitted.
        self.assertEqual(self.fleet.counter("tenantgate.fleet_calls") - calls, 3 * FLEET_RATE)
        refused = [r for r in rs if r.status == 429]
        self.assertEqual(set(limits_of(rs)), {"rpm"})
        self.assertRegex(refused[0].headers.get("ratelimit-policy", ""), rf'"rpm";q={FLEET_RATE};w=60\b')
        self.assertRegex(refused[0].headers.get("ratelimit", ""), r'"rpm";r=0;t=\d+')
        retry = int(refused[0].headers.get("retry-after", "0"))
        self.assertTrue(1 <= retry <= 60, refused[0].headers)

    def test_local_and_fleet_limits_on_one_chain_both_hold_and_nothing_leaks(self):
        f, envoy = self.fleet, self.fleet.envoys[0]
        calls = f.counter("tenantgate.fleet_calls")
        # 25 quick requests to one Envoy: the fleet (10) refuses 15. Their
        # local tokens go back: had they not, the local burst (20) would
        # refuse the last 5 itself ("rps").
        rs = [envoy.request("GET", "/items", TIGHT) for _ in range(TIGHT_BURST + 5)]
        self.assertEqual(statuses(rs), {200: TIGHT_FLEET, 429: TIGHT_BURST + 5 - TIGHT_FLEET})
        self.assertEqual(set(limits_of(rs)), {"rpm"})
        self.assertEqual(f.redis.count("/tight", "rpm"), TIGHT_FLEET)
        # A new fleet window: now the local bucket (about 10 tokens left)
        # refuses first, with no call and no fleet count.
        f.redis.flush()
        calls = f.counter("tenantgate.fleet_calls")
        rs = [envoy.request("GET", "/items", TIGHT) for _ in range(TIGHT_BURST)]
        admitted = statuses(rs).get(200, 0)
        self.assertTrue(TIGHT_BURST - TIGHT_FLEET <= admitted <= TIGHT_BURST - TIGHT_FLEET + 2, statuses(rs))
        self.assertEqual(set(limits_of(rs)), {"rps"})
        self.assertEqual(f.counter("tenantgate.fleet_calls") - calls, admitted)
        self.assertEqual(f.redis.count("/tight", "rpm"), admitted)

    def test_the_service_stopped_then_back(self):
        f = self.fleet
        errors = f.counter("tenantgate.fleet_errors")
        f.rls.stop()
        try:
            start = time.monotonic()
            rs = f.spread(6)
            took = time.monotonic() - start
            # on_error "allow" (the default): served, each well within a second.
            self.assertEqual(statuses(rs), {200: 6})
            self.assertLess(took, 6.0)
            self.assertEqual(f.counter("tenantgate.fleet_errors") - errors, 6)
        finally:
            f.rls = Rls(f.bundle, f.redis.url, f.work, f.rls_port).start()
        # Back: calls succeed again (Envoy reconnects on its own) and count.
        f.redis.flush()
        self.assertTrue(f.answers_again(10), "the service did not come back")
        self.assertGreaterEqual(f.redis.count("/fleet", "rpm"), 1)

    def test_redis_stopped_then_back(self):
        f = self.fleet
        errors = f.counter("tenantgate.fleet_errors")
        f.redis.stop()
        try:
            # The service answers UNAVAILABLE, or the call outlives
            # timeout_ms (200): either way on_error ("allow") decides.
            start = time.monotonic()
            rs = f.spread(3)
            self.assertEqual(statuses(rs), {200: 3})
            self.assertLess(time.monotonic() - start, 3.0)
            self.assertEqual(f.counter("tenantgate.fleet_errors") - errors, 3)
        finally:
            f.redis.start()

        # The service reconnects on its own: calls succeed and count again.
        self.assertTrue(f.answers_again(15), "no answer after Redis came back")
        self.assertGreaterEqual(f.redis.count("/fleet", "rpm"), 1)


class BlackHole:
    """Accepts connections and never answers: a service past any timeout."""

    def __init__(self):
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


def one_envoy(name, hole, **rls):
    """A Fleet of one Envoy whose rate limit service is `hole`."""
    f = Fleet(name, **rls)
    f.rls_port = hole.port
    f.redis.start()
    f.upstream.start()
    try:
        f.envoys = [render(f.bundle, f.work, "envoy0", f.upstream.port, f.rls_port).start()]
    except Exception:
        f.stop()
        raise
    return f


def remaining_minute(response):
    """`r` of the `minute` item of a RateLimit field: the local tokens left."""
    import re
    m = re.search(r'"minute";r=(\d+)', response.headers.get("ratelimit", ""))
    return int(m.group(1)) if m else None


class SlowService(unittest.TestCase):
    def test_deny_refuses_with_503_after_the_timeout_and_the_body_waits(self):
        hole = BlackHole()
        f = one_envoy("on-error-deny", hole, on_error="deny", timeout_ms=100)
        try:
            # A service that never answers: 503 once timeout_ms (100) passed.
            start = time.monotonic()
            r = f.envoys[0].request("GET", "/items", WHO)
            took = time.monotonic() - start
            self.assertEqual(r.status, 503, r)
            self.assertEqual(r.json().get("error"), "unavailable", r)
            self.assertTrue(0.09 <= took < 1.0, took)
            self.assertEqual(f.counter("tenantgate.fleet_errors"), 1)
            # A request with a body: the body waits with the headers, so
            # nothing reaches the upstream before the (failed) check.
            r = f.envoys[0].request("POST", "/items", WHO, body=b"x" * 200_000)
            self.assertEqual(r.status, 503, r)
            # A tenant without fleet limits is not affected.
            r = f.envoys[0].request("GET", "/docs", {"x-tenant": "/public", "x-user": "pat",
                                                    "x-user-tenant": "/public"})
            self.assertEqual(r.status, 200, r)
            def refused():
                lines = [a for a in h.audit_lines(f.envoys[0]) if a.get("status") == 503]
                return lines if len(lines) >= 2 else None

            lines = h.wait_for(refused, 5) or []
            self.assertEqual(len(lines), 2)
            self.assertEqual(lines[0]["errors"],
                             ["rate limit service: gRPC status 14 (unavailable, or past timeout_ms)"])
        finally:
            f.stop()
            hole.close()

    def test_a_client_gone_while_its_check_is_pending_gives_its_local_tokens_back(self):
        import socket
        hole = BlackHole()
        f = one_envoy("client-reset", hole, on_error="allow", timeout_ms=1500)
        try:
            envoy = f.envoys[0]
            first = envoy.request("GET", "/items", SLOW, timeout=5)
            self.assertEqual(first.status, 200, first)
            before = remaining_minute(first)
            self.assertIsNotNone(before, first.headers)
            # Five clients send a request and leave while it waits for the service.
            for _ in range(5):
                c = socket.create_connection(("127.0.0.1", envoy.listen_port))
                c.sendall(b"GET /items HTTP/1.1\r\nhost: x\r\nx-tenant: /slow\r\nx-user: sam\r\n"
                          b"x-user-tenant: /slow\r\n\r\n")
                time.sleep(0.1)
                c.close()
            after = envoy.request("GET", "/items", SLOW, timeout=5)
            self.assertEqual(after.status, 200, after)
            # One token for this request; the five left without costing any
            # (refill: one token per 3 s, about 1 s passed). Had they kept
            # their tokens, 6 would be gone.
            got = remaining_minute(after)
            print(f"\n  client resets: `minute` remaining {before} before, {got} after 5 resets and 1 request",
                  file=sys.stderr)
            self.assertIn(got, (before - 1, before), (before, got))
        finally:
            f.stop()
            hole.close()


INTERVAL_MS = 100


class Batched(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fleet = Fleet("batched", mode="batched", report_interval_ms=INTERVAL_MS).start()

    @classmethod
    def tearDownClass(cls):
        cls.fleet.stop()

    def test_reports_per_interval_and_the_overshoot_stays_within_its_bound(self):
        f = self.fleet
        f.redis.flush()
        calls = f.counter("tenantgate.fleet_calls")
        n, pace = 200, 0.01  # 100 requests per second over 2 s
        start = time.monotonic()
        rs = f.spread(n, pace_s=pace)
        took = time.monotonic() - start
        counts = statuses(rs)
        admitted = counts.get(200, 0)
        rate = n / took
        # The bound (docs/fleet.md): every worker learns of the crossing from
        # the answer to its next report, so what arrives in two intervals and
        # one call (at most timeout_ms, 200 here) may pass the limit.
        bound = FLEET_RATE + rate * (2 * INTERVAL_MS + 200) / 1000
        time.sleep(3 * INTERVAL_MS / 1000)
        made = f.counter("tenantgate.fleet_calls") - calls
        intervals = (time.monotonic() - start) / (INTERVAL_MS / 1000)
        print(f"\n  batched: {n} requests at {rate:.0f}/s over 3 Envoys x 2 workers, fleet limit "
              f"{FLEET_RATE}/min: {counts}, admitted {admitted} (bound {bound:.0f}), "
              f"service count {f.redis.count('/fleet', 'rpm')}, {made} calls in {intervals:.0f} intervals",
              file=sys.stderr)
        self.assertGreaterEqual(admitted, FLEET_RATE)
        self.assertLessEqual(admitted, bound)
        self.assertEqual(set(limits_of(rs)), {"rpm"})
        # Reports count everything admitted, past the limit too.
        self.assertEqual(f.redis.count("/fleet", "rpm"), admitted)
        # No call per request: at most one report per worker per interval.
        self.assertLessEqual(made, 6 * (intervals + 1))
        self.assertLess(made, n / 2)


if __name__ == "__main__":
    sys.exit(h.run_tests(__name__, "envoy-fleet", WORK))
